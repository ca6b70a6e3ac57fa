"""Nodes of the clinic: dataset lint, diagnosing a run, the sweet spot."""
