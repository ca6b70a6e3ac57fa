"""Nodes that load, stack and mix LoRAs, and describe the loaded model."""
