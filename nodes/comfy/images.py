"""Images between ComfyUI tensors, PIL and latents: previews of latents, VAE decoding."""

from __future__ import annotations

import logging

import comfy.latent_formats
import comfy.utils
import numpy as np
import torch
from einops import einsum
from PIL import Image
from torch import Tensor

LOG = logging.getLogger("klein_lora_lab")


def tensor_to_pil(image: Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, 3] (0..1) -> PIL images."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def latent_preview(latent: Tensor) -> Tensor:
    """A cheap RGB view of Flux2 latents [B, 128, h, w] -> IMAGE [B, 2h, 2w, 3], using ComfyUI's factors."""
    fmt = comfy.latent_formats.Flux2()
    x = fmt.latent_rgb_factors_reshape(latent.float().cpu())  # [B, 32, 2h, 2w]
    factors = torch.tensor(fmt.latent_rgb_factors)  # [32, 3]
    bias = torch.tensor(fmt.latent_rgb_factors_bias)
    rgb = einsum(x, factors, "b c h w, c k -> b h w k") + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1)


def decode_images(latent: Tensor, vae=None) -> Tensor:
    """Flux2 latents [B, 128, h, w] -> IMAGE [B, H, W, 3]: the VAE when given (as VAE Decode: a video VAE's
    [B, T, H, W, 3] becomes one batch), else the latent preview."""
    if vae is None:
        return latent_preview(latent)
    images = vae.decode(latent)
    return images.reshape(-1, *images.shape[-3:])
