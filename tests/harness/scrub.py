"""The Scrub Run node called in-process as ComfyUI calls it: `scrub_run(defaults, **overrides)`.

Each test file keeps its own defaults (its model, run, checkpoints, scales, prompts and render widgets); the
arguments every such call shares are here: the fake CLIP, no extra LoRA files, every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .comfy_test_nodes import FakeClip


def scrub_run(defaults: Mapping[str, Any], **overrides: Any):
    """KleinLabScrubRun.execute under inference mode (as ComfyUI runs a node) with `defaults`, then `overrides`,
    over lora_files "", block_preset "all" and a FakeClip; returns the node's output."""
    from klein_lora_lab.nodes.scrub.scrub_run import KleinLabScrubRun

    args = {"lora_files": "", "block_preset": "all", "clip": FakeClip(), **defaults, **overrides}
    with torch.inference_mode():
        return KleinLabScrubRun.execute(**args)
