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
    "train.sweep",
    "train.training_options",
    "train.loss_curve",
    "loras.lora_loader_blocks",
    "loras.lora_stack",
    "loras.lora_mixer",
    "loras.save_lora_as",
    "diagnose.dataset_lint",
    "diagnose.diagnose_run",
    "diagnose.sweet_spot",
    "diagnose.sweep_curves",
    "scrub.scrub_run",
    "scrub.mixer_grid",
    "scrub.compare_frames",
)


class KleinLabExtension(ComfyExtension):
    async def on_load(self) -> None:
        """Before the nodes are listed: earlier runs' checkpoints join ComfyUI's loras list (so every LoRA
        loader lists them from startup), the LoRA file cache starts answering to ComfyUI's memory frees, and the
        training panel's routes (history, Stop & keep, Sample now) are served. All are idempotent."""
        from .comfy.lora_cache import install_memory_hook
        from .comfy.paths import register_runs_folder
        from .comfy.routes import register_routes

        register_runs_folder()
        install_memory_hook()
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            nodes.extend(module.NODES)
        return nodes
