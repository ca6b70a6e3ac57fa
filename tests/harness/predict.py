"""Predictions of a MODEL as ComfyUI's sampler computes them, and core's stock LoRA merge (the reference)."""

from __future__ import annotations

import torch


def predict(patcher, context_dim: int) -> torch.Tensor:
    """The model's prediction at a fixed input (patcher loaded, its wrappers in `transformer_options`), computed on
    the patcher's load device (the CPU or a GPU) and returned on the CPU as float32."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(7)
    device = patcher.load_device
    x = torch.randn(1, 128, 4, 4, generator=gen).to(device)
    ctx = torch.randn(1, 6, context_dim, generator=gen).to(device)
    sigma = torch.tensor([0.7], device=device)
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options).float().cpu()


def core_merged(model, sd: dict, strength: float):
    """Core's stock LoraLoader path: `load_lora_for_models` (weights merged on load)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)[0]
