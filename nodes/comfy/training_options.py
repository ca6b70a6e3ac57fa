"""The socket that carries Training Options (memory, optimizer, schedule, σ sampling, EMA, ...) to the Train node."""

from __future__ import annotations

from comfy_api.latest import io

TRAINING_OPTIONS = io.Custom("KLEIN_TRAINING_OPTIONS")
