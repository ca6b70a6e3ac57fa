"""The pack's ComfyExtension: every node module under `nodes/` that exposes `NODES` is listed here."""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

# One entry per node file; each module exposes NODES: list[type[io.ComfyNode]].
NODE_MODULES: tuple[str, ...] = (
    "loras.model_info",
    "train.dataset_folder",
    "train.dataset_pairs",
    "train.encode_dataset",
    "train.train_lora",
    "train.loss_curve",
    "loras.lora_loader_blocks",
    "loras.lora_stack",
    "loras.lora_mixer",
    "diagnose.dataset_lint",
    "diagnose.diagnose_run",
    "diagnose.sweet_spot",
    "scrub.scrub_run",
    "scrub.mixer_grid",
    "scrub.compare_frames",
)


class KleinLabExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .comfy.routes import register_routes  # the training panel's routes (history, Stop & keep, ...)

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            nodes.extend(module.NODES)
        return nodes
