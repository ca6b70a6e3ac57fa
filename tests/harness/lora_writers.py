"""A LoRA state dict in this pack's own key style, built without the pack's file writer: the reader tests and
benchmarks feed it to `read_lora` next to the kohya and diffusers writers of trainer_core/lora/lora_formats.py."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
from torch import Tensor


def write_peft(weights: Mapping[str, LoraWeights], down_up: bool = False, with_alpha: bool = True) -> dict[str, Tensor]:
    """Ours: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha` (`lora_down/up` if down_up).

    Without alpha the reader assumes alpha = rank, so alpha/rank is folded into the up weights.
    """
    a, b = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        out[f"diffusion_model.{name}.{a}.weight"] = w.down.contiguous()
        if with_alpha:
            out[f"diffusion_model.{name}.{b}.weight"] = w.up.contiguous()
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(w.alpha))
        else:
            out[f"diffusion_model.{name}.{b}.weight"] = (w.up * w.scale).contiguous()
    return out
