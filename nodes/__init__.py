"""Thin V3 nodes: widgets -> config, ComfyUI objects -> trainer_core calls, results -> UI."""
