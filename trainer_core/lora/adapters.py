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

# A trained LoRA changes base weights by far less than 1 per entry; a change above this (at strength 1) comes from a
# broken file (alpha 1e30, weights near the float limits) and would turn the model's output into Inf/NaN.
MAX_WEIGHT_CHANGE = 1e3
MULTIPLIER_LIMIT = 100.0  # |strength · block weight| of one module in an AdapterStack


def check_lora_weights(weights: Mapping[str, LoraWeights], source: str) -> None:
    """Refuse a LoRA read from a file whose rank is 0, whose alpha is not finite, or whose scale and weights make
    a non-finite or absurd weight change; the message names the file (`source`) and the module."""
    for name, w in weights.items():
        if w.rank == 0:
            raise ValueError(f"{source}: module {name!r} has rank 0 (an empty LoRA pair). Fix: use another file.")
        if not math.isfinite(w.alpha):
            raise ValueError(f"{source}: module {name!r} has alpha {w.alpha!r}. Fix: use another file.")
        change = w.largest_change()
        if not math.isfinite(change) or change > MAX_WEIGHT_CHANGE:
            raise ValueError(
                f"{source}: module {name!r} would change the model's weights by up to {change:.3g} at strength 1 "
                f"(alpha {w.alpha:.3g}, rank {w.rank}, scale alpha/rank {w.scale:.3g}); trained LoRAs stay far below "
                f"1 and anything above {MAX_WEIGHT_CHANGE:g} makes the output Inf/NaN. The file is broken: use an "
                "earlier checkpoint or another file."
            )


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

    def largest_change(self) -> float:
        """The largest |entry| of the dense weight change at strength 1 (exact only when a cheap bound exceeds
        MAX_WEIGHT_CHANGE: rank · max|up| · max|down| · |scale| bounds every entry of up @ down · scale)."""
        if self.rank == 0 or self.down.numel() == 0 or self.up.numel() == 0:
            return 0.0
        up_max, down_max = float(self.up.detach().abs().max()), float(self.down.detach().abs().max())
        bound = abs(self.scale) * self.rank * up_max * down_max  # python floats: no fp32 overflow
        if not math.isfinite(bound) or bound <= MAX_WEIGHT_CHANGE:
            return bound
        return float((self.up.detach().double() @ self.down.detach().double()).abs().max()) * abs(self.scale)

    def delta_weight(self) -> Tensor:
        """The dense weight change [out, in] this LoRA stands for at strength 1."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True)
class DenseDelta:
    """One module's adapter as its dense weight change ΔW [out, in] at strength 1.

    LoKr, LoHa, DoRA and full `.diff` patches are not low-rank: their ΔW is built once (with PEFT's math, see
    `adapter_math`) and applied as `x ΔWᵀ · scale` or merged into a weight copy, like a LoRA.
    """

    delta: Tensor

    def delta_weight(self) -> Tensor:
        return self.delta.float()


# What a stack entry may be: a low-rank LoRA, or a dense weight change.
Adapter = LoraWeights | DenseDelta


def add_lora(x: Tensor, y: Tensor, down: Tensor | None, up: Tensor, scale: float) -> Tensor:
    """y + scale · x downᵀ upᵀ with the scale and the add fused into the second matmul (one pass over y).

    x [..., in] (a Linear's input), y [..., out] (its output), down [r, in], up [out, r]; down None means `up` is
    a dense ΔW [out, in] (y + scale · x ΔWᵀ).
    """
    if down is None:
        out = torch.addmm(
            y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).to(y.dtype), up.t().to(y.dtype), alpha=scale
        )
        return out.view(y.shape)
    h = x.reshape(-1, x.shape[-1]) @ down.t().to(x.dtype)  # [tokens, r]
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.to(y.dtype), up.t().to(y.dtype), alpha=scale)
    return out.view(y.shape)


def merged_weight(weight: Tensor, lora: tuple[Tensor | None, Tensor, float]) -> Tensor:
    """W + s·U·D (or W + s·ΔW for a dense delta) as a new tensor; the base weight is left untouched."""
    down, up, scale = lora
    if down is None:
        return torch.add(weight, up, alpha=scale)
    return torch.addmm(weight, up, down, alpha=scale)


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
        rslora: bool = False,
    ) -> None:
        """targets: module name -> (in_features, out_features). Init is seeded by `generator`.

        rslora: scale the delta by alpha/√rank (rank-stabilised LoRA, PEFT's `use_rslora`) instead of alpha/rank."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank}: must be at least 1.")
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = rslora
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
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    @property
    def file_alpha(self) -> float:
        """The alpha a file stores so that every loader's alpha/rank is this LoRA's scale (rsLoRA: alpha·√rank)."""
        return self.scale * self.rank

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
            name: LoraWeights(self.down[key].detach().clone(), self.up[key].detach().clone(), self.file_alpha)
            for name, key in self._index.items()
        }


@dataclass
class _Entry:
    down: Tensor | None  # None: `up` is a dense ΔW [out, in]
    up: Tensor
    scale: float  # alpha/rank · strength · per-module weight, already multiplied


def _check_multiplier(value: float, what: str) -> None:
    """The last guard before a strength reaches the forward pass: NaN, Inf or an absurd size is refused by name,
    whichever path (widget, /prompt, stack, scrub) it came through."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {type(value).__name__}, not a number.")
    if not math.isfinite(value) or abs(value) > MULTIPLIER_LIMIT:
        raise ValueError(
            f"{what} is {value!r}: it must be a finite number within ±{MULTIPLIER_LIMIT:g} (the loaders use -4..4)."
        )


class AdapterStack:
    """Several frozen LoRAs applied at forward time; strengths can change at any moment at no cost."""

    def __init__(self) -> None:
        self._layers: dict[str, list[tuple[str, _Entry]]] = {}

    def set_lora(
        self,
        lora_id: str,
        weights: Mapping[str, Adapter],
        strength: float,
        module_strength: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add or replace LoRA `lora_id`. module_strength multiplies per module (block weights); default 1.

        Strength and block weights multiply the delta of every adapter type alike (a dense ΔW as a LoRA's)."""
        self.remove(lora_id)
        _check_multiplier(strength, f"strength of LoRA {lora_id!r}")
        for name, w in weights.items():
            mult = 1.0 if module_strength is None else module_strength.get(name, 1.0)
            _check_multiplier(mult, f"block strength of {name!r}")
            _check_multiplier(mult * strength, f"strength × block strength of {name!r}")
            if mult == 0.0 or strength == 0.0:
                continue
            if isinstance(w, DenseDelta):
                entry = _Entry(None, w.delta.to(device=device, dtype=dtype), strength * mult)
            else:
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

    def fused(self, name: str) -> tuple[Tensor | None, Tensor, float] | None:
        """This module's LoRAs as one (down [Σr, in], up [out, Σr], scale): delta = scale · x downᵀ upᵀ.

        One LoRA is returned as is; several are concatenated with their scales folded into the ups (a copy).
        When any of them is dense, all are summed into one dense ΔW (down None): a dense delta costs a full
        [out, in] pass anyway, and one sum keeps it to one.
        """
        entries = self._layers.get(name)
        if not entries:
            return None
        if len(entries) == 1:
            e = entries[0][1]
            return e.down, e.up, e.scale
        if any(e.down is None for _, e in entries):
            total = torch.zeros_like(next(e.up for _, e in entries if e.down is None))
            for _, e in entries:
                total += e.up * e.scale if e.down is None else (e.up @ e.down) * e.scale
            return None, total, 1.0
        down = torch.cat([e.down for _, e in entries], dim=0)
        up = torch.cat([e.up * e.scale for _, e in entries], dim=1)
        return down, up, 1.0

    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y + delta(x), each LoRA's scale and add fused into its second matmul (one pass over y per LoRA)."""
        for _, e in self._layers.get(name, ()):
            y = add_lora(x, y, e.down, e.up, e.scale)
        return y
