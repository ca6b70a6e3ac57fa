"""Run folders: run.json, checkpoints with optimizer state, metrics, samples; resume."""
