"""Nodes that render a run's checkpoints × scales, mixer grids and A/B comparisons."""
