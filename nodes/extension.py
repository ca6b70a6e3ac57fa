"""The pack's ComfyExtension: every node module under `nodes/` that exposes `NODES` is listed here."""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

# One entry per node file; each module exposes NODES: list[type[io.ComfyNode]].
NODE_MODULES: tuple[str, ...] = (
    "model_info",
    "dataset_folder",
    "dataset_pairs",
    "encode_dataset",
    "train_lora",
    "loss_curve",
    "lora_loader_blocks",
    "lora_stack",
    "lora_mixer",
    "dataset_lint",
    "diagnose_run",
    "sweet_spot",
    "scrub_run",
    "mixer_grid",
    "compare_frames",
)


class KleinLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            nodes.extend(module.NODES)
        return nodes
