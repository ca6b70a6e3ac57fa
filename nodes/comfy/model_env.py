"""The MODEL ComfyUI holds, made ready for training: loaded onto the device (never a second copy), out of
inference mode, with `in_training` set, and given back afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import comfy.model_management as mm
import torch
from torch import nn

LOG = logging.getLogger("klein_lora_lab")


@contextmanager
def loaded_for_training(model_patcher) -> Iterator[tuple[nn.Module, torch.device]]:
    """Unload every other model, load this MODEL fully onto its device and yield (diffusion model, device).

    The diffusion model is the very module ComfyUI loaded (`model_patcher.model.diffusion_model`): no clone of
    the weights, no deepcopy. On exit the device cache is emptied; the model stays loaded for sampling next.
    """
    mm.unload_all_models()
    mm.soft_empty_cache()
    mm.load_models_gpu([model_patcher], force_full_load=True)
    diffusion_model = model_patcher.model.diffusion_model
    normalize_inference_tensors(diffusion_model)
    try:
        yield diffusion_model, model_patcher.load_device
    finally:
        mm.cleanup_models_gc()
        mm.soft_empty_cache(force=True)


def normalize_inference_tensors(module: nn.Module) -> int:
    """Turn parameters/buffers created under inference mode into normal tensors with the same values.

    ComfyUI loads models while executing a node, i.e. under `torch.inference_mode()`, and autograd refuses to
    save inference tensors for backward (every frozen Linear weight is saved to compute the input gradient).
    Each tensor is cloned once and swapped in place of the old one, so the model never exists twice (peak
    overhead: one tensor); values, dtypes and devices are unchanged and the tensors keep working for inference.
    Returns how many tensors were converted.
    """
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    converted += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    converted += 1
    return converted


def reload_model(model_patcher) -> None:
    """Make sure the MODEL is back on its device (a VAE decode between steps may have moved it off)."""
    mm.load_models_gpu([model_patcher], force_full_load=True)


@contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on and `in_training` set, both restored afterwards whatever happens."""
    previous = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        mm.in_training = True
        try:
            yield
        finally:
            mm.in_training = previous
