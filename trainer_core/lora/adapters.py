"""Forward-time LoRA adapters: the extra output `scale · B(A(x))` of a target Linear, never merged into weights.

Conventions follow PEFT and ComfyUI exactly: A ("lora_A" / "lora_down") is [rank, in], B ("lora_B" /
"lora_up") is [out, rank], the delta is `(alpha / rank) · strength · x Aᵀ Bᵀ`, A starts Kaiming-uniform(a=√5)
and B starts at zero, so a fresh adapter leaves the model's output unchanged.

`LoraTrainable` holds one trainable LoRA (training). `AdapterStack` holds any number of frozen LoRAs with
per-LoRA and per-module strengths (loading, mixing, scrubbing): a new strength or checkpoint swaps small
tensors in the stack and never touches the base weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA in canonical form: down [rank, in], up [out, rank], alpha."""

    down: Tensor
    up: Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA shapes do not fit: down {tuple(self.down.shape)} and up {tuple(self.up.shape)} "
                "must be [rank, in] and [out, rank]."
            )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> Tensor:
        """The dense weight change [out, in] this LoRA stands for at strength 1."""
        return (self.up.float() @ self.down.float()) * self.scale


def add_lora(x: Tensor, y: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """y + scale · x downᵀ upᵀ with the scale and the add fused into the second matmul (one pass over y).

    x [..., in] (a Linear's input), y [..., out] (its output), down [r, in], up [out, r].
    """
    h = x.reshape(-1, x.shape[-1]) @ down.t().to(x.dtype)  # [tokens, r]
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.to(y.dtype), up.t().to(y.dtype), alpha=scale)
    return out.view(y.shape)


def _param_key(name: str) -> str:
    # nn.ParameterDict keys may not contain '.', module names do.
    return name.replace(".", "__")


class LoraTrainable(nn.Module):
    """A trainable LoRA over a set of target Linear modules of a Klein model."""

    def __init__(
        self,
        targets: Mapping[str, tuple[int, int]],
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """targets: module name -> (in_features, out_features). Init is seeded by `generator`."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank}: must be at least 1.")
        self.rank = rank
        self.alpha = float(alpha)
        self.names = tuple(sorted(targets))
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name in self.names:
            fan_in, fan_out = targets[name]
            # Kaiming-uniform with a=√5, as nn.Linear and PEFT initialise lora_A: bound = 1/√fan_in.
            bound = 1.0 / math.sqrt(fan_in)
            a = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
            self.down[_param_key(name)] = nn.Parameter(a.to(device=device, dtype=dtype))
            self.up[_param_key(name)] = nn.Parameter(torch.zeros(fan_out, rank, device=device, dtype=dtype))
        self._index = {name: _param_key(name) for name in self.names}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y + delta(x), with the add and the scale fused into the second matmul (one pass over y)."""
        key = self._index.get(name)
        if key is None:
            return y
        return add_lora(x, y, self.down[key], self.up[key], self.scale)

    def fused(self, name: str) -> tuple[Tensor, Tensor, float] | None:
        """Module `name`'s (down [r, in], up [out, r], scale), the live parameters (gradients flow), or None."""
        key = self._index.get(name)
        if key is None:
            return None
        return self.down[key], self.up[key], self.scale

    def weights(self) -> dict[str, LoraWeights]:
        """Detached copies of the current weights, by module name."""
        return {
            name: LoraWeights(self.down[key].detach().clone(), self.up[key].detach().clone(), self.alpha)
            for name, key in self._index.items()
        }

    def load_weights(self, weights: Mapping[str, LoraWeights]) -> None:
        """Load weights saved from a LoRA of the same targets and rank (resume)."""
        missing = sorted(set(self.names) - set(weights))
        extra = sorted(set(weights) - set(self.names))
        if missing or extra:
            raise ValueError(f"LoRA targets differ: missing {missing[:5]}, unexpected {extra[:5]}.")
        with torch.no_grad():
            for name, key in self._index.items():
                w = weights[name]
                if w.rank != self.rank:
                    raise ValueError(f"{name}: rank {w.rank} in the file, {self.rank} in the settings.")
                self.down[key].copy_(w.down)
                self.up[key].copy_(w.up)


@dataclass
class _Entry:
    down: Tensor
    up: Tensor
    scale: float  # alpha/rank · strength · per-module weight, already multiplied


class AdapterStack:
    """Several frozen LoRAs applied at forward time; strengths can change at any moment at no cost."""

    def __init__(self) -> None:
        self._layers: dict[str, list[tuple[str, _Entry]]] = {}

    def set_lora(
        self,
        lora_id: str,
        weights: Mapping[str, LoraWeights],
        strength: float,
        module_strength: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add or replace LoRA `lora_id`. module_strength multiplies per module (block weights); default 1."""
        self.remove(lora_id)
        for name, w in weights.items():
            mult = 1.0 if module_strength is None else module_strength.get(name, 1.0)
            if mult == 0.0 or strength == 0.0:
                continue
            entry = _Entry(w.down.to(device=device, dtype=dtype), w.up.to(device=device, dtype=dtype), 0.0)
            entry.scale = w.scale * strength * mult
            self._layers.setdefault(name, []).append((lora_id, entry))

    def remove(self, lora_id: str) -> None:
        for name in list(self._layers):
            kept = [(i, e) for i, e in self._layers[name] if i != lora_id]
            if kept:
                self._layers[name] = kept
            else:
                del self._layers[name]

    def names(self) -> Iterable[str]:
        return self._layers.keys()

    def fused(self, name: str) -> tuple[Tensor, Tensor, float] | None:
        """This module's LoRAs as one (down [Σr, in], up [out, Σr], scale): delta = scale · x downᵀ upᵀ.

        One LoRA is returned as is; several are concatenated with their scales folded into the ups (a copy).
        """
        entries = self._layers.get(name)
        if not entries:
            return None
        if len(entries) == 1:
            e = entries[0][1]
            return e.down, e.up, e.scale
        down = torch.cat([e.down for _, e in entries], dim=0)
        up = torch.cat([e.up * e.scale for _, e in entries], dim=1)
        return down, up, 1.0

    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y + delta(x), each LoRA's scale and add fused into its second matmul (one pass over y per LoRA)."""
        for _, e in self._layers.get(name, ()):
            y = add_lora(x, y, e.down, e.up, e.scale)
        return y
