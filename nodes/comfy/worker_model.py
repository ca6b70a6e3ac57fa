"""The MODEL as a worker process gets it: the same diffusion-model file loaded again, the way its loader did.

A worker cannot receive ComfyUI's module (the weights would be copied through a pipe, once per worker and GPU);
it loads the file itself. ComfyUI's loaders record how they made a MODEL in `ModelPatcher.cached_patcher_init`
(`comfy.sd.load_diffusion_model` with the file path and model options for 'Load Diffusion Model', the checkpoint
loader for full checkpoints), the same record ComfyUI uses to load a model again itself; the worker calls it.

A MODEL that carries changes the record does not hold (LoRAs patched in upstream, object patches, wrappers) is
refused: the worker would train on another model than the one connected.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from ...trainer_core.errors import pack_error


@pack_error
class WorkerModelError(ValueError):
    """The MODEL cannot be loaded again in a worker process; the message says why and what to connect."""


def _carried_changes(model_patcher) -> list[str]:
    found = []
    if model_patcher.patches:
        found.append(f"{len(model_patcher.patches)} patched weight(s) (a LoRA loaded before this node)")
    if model_patcher.object_patches:
        found.append(f"object patches ({', '.join(sorted(model_patcher.object_patches))})")
    if any(fns for per_type in model_patcher.wrappers.values() for fns in per_type.values()):
        found.append("model wrappers (forward-time LoRAs or other nodes' patches)")
    return found


@dataclass(frozen=True)
class LoaderSource:
    """How ComfyUI made the MODEL (its cached_patcher_init): picklable, called again in the worker."""

    loader: str  # "comfy.sd:load_diffusion_model": imported in the worker once its ComfyUI options are set
    args: tuple
    index: int | None  # which of the loader's outputs is the MODEL (checkpoint loaders return several)
    parse_args: bool  # ComfyUI read its command line (the server): the worker reads the same one

    def load(self, device: torch.device) -> nn.Module:
        import comfy.options

        # Before comfy's other modules: the worker gets the server's flags (dtypes, --cpu), as spawn passes argv.
        comfy.options.enable_args_parsing(self.parse_args)
        import comfy.model_management as mm

        # A worker only trains: ComfyUI's layers behave as in the Train node's training_mode for the whole process.
        mm.in_training = True
        module, name = self.loader.split(":")
        patcher = getattr(importlib.import_module(module), name)(*self.args, disable_dynamic=True)
        if self.index is not None:
            patcher = patcher[self.index]
        return patcher.model.diffusion_model.to(device)


def model_source(model_patcher) -> LoaderSource:
    """The MODEL's loader record, or WorkerModelError naming what a worker could not rebuild."""
    changes = _carried_changes(model_patcher)
    if changes:
        raise WorkerModelError(
            f"devices: the MODEL carries {'; '.join(changes)}, which worker processes cannot load again. Fix: "
            "connect 'Load Diffusion Model' straight to this node, or leave devices empty to train in this process."
        )
    init = getattr(model_patcher, "cached_patcher_init", None)
    if init is None:
        raise WorkerModelError(
            "devices: this MODEL does not say which file it was loaded from (its loader kept no record), so worker "
            "processes cannot load it. Fix: load it with 'Load Diffusion Model', or leave devices empty."
        )
    import comfy.options

    loader = f"{init[0].__module__}:{init[0].__qualname__}"
    return LoaderSource(loader, tuple(init[1]), init[2] if len(init) > 2 else None, comfy.options.args_parsing)
