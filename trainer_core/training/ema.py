"""Exponential moving average of the LoRA weights (EMA), kept in fp32 beside the trained weights.

After every optimizer step: ema ← decay·ema + (1 − decay)·w (torch's `_foreach_lerp_`, one fused pass). The
average starts at the initial weights, so early checkpoints still lean on the start (a decay of 0.999 averages
roughly the last 1000 steps). Saved beside each checkpoint as `step_000500.ema.safetensors`, a LoRA file like
any other: it shows in the loras list, so every loader can pick it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..lora.adapters import LoraTrainable, LoraWeights

STATE_PREFIX = "ema."


def ema_path(checkpoint: Path) -> Path:
    """The EMA file beside checkpoint `step_000500.safetensors`: `step_000500.ema.safetensors`."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".ema.safetensors")


class LoraEma:
    """The running average of a LoraTrainable's parameters (same names, fp32)."""

    def __init__(self, lora: LoraTrainable, decay: float) -> None:
        self.decay = decay
        self.lora = lora
        self.shadow = {k: p.detach().float().clone() for k, p in lora.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        params = dict(self.lora.named_parameters())
        current = [params[k].detach().float() for k in names]
        torch._foreach_lerp_([self.shadow[k] for k in names], current, 1 - self.decay)

    def weights(self) -> dict[str, LoraWeights]:
        """The averaged LoRA in the shape `save_lora` takes."""
        out = {}
        for name in self.lora.names:
            key = self.lora._index[name]
            down, up = self.shadow[f"down.{key}"].clone(), self.shadow[f"up.{key}"].clone()
            out[name] = LoraWeights(down, up, self.lora.file_alpha)
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {STATE_PREFIX + k: v for k, v in self.shadow.items()}

    def load_state(self, tensors: dict[str, Tensor]) -> bool:
        """Restore from resume-state tensors; False (average restarted at the current weights) when absent."""
        found = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if set(found) != set(self.shadow):
            self.shadow = {k: p.detach().float().clone() for k, p in self.lora.named_parameters()}
            return False
        for k, v in found.items():
            self.shadow[k].copy_(v)
        return True
