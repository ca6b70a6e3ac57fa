"""Checks that the hosting ComfyUI can run this pack: V3 node API and FLUX.2 (Klein) support."""

from __future__ import annotations

import importlib
import importlib.util


def unsupported_reason() -> str | None:
    """Return why this ComfyUI cannot host the pack (with the fix), or None when it can."""
    if importlib.util.find_spec("comfy_api") is None or importlib.util.find_spec("comfy_api.latest") is None:
        return "this ComfyUI has no V3 node API (comfy_api.latest); update ComfyUI to 0.29 or newer."
    supported = importlib.import_module("comfy.supported_models")
    if not hasattr(supported, "Flux2"):
        return "this ComfyUI has no FLUX.2 support (comfy.supported_models.Flux2); update ComfyUI to 0.29 or newer."
    return None
