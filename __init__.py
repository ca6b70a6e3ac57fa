"""Klein LoRA Lab: a ComfyUI node pack for FLUX.2 [klein] Base LoRAs.

Importing this file does nothing heavy: ComfyUI calls `comfy_entrypoint()` and only then are the nodes (and
torch-using code) imported. A ComfyUI too old for V3 nodes or without FLUX.2 support gets one log line and no
nodes; its start is never broken.
"""

from __future__ import annotations

import logging

WEB_DIRECTORY = "./js"
LOG = logging.getLogger("klein_lora_lab")


async def comfy_entrypoint():
    """Return the pack's ComfyExtension, or None (with one log line) when this ComfyUI cannot host it."""
    from .nodes.compat import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        LOG.warning("Klein LoRA Lab: not loaded: %s", reason)
        return None
    from .nodes.extension import KleinLabExtension

    return KleinLabExtension()
