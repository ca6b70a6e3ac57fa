"""The dense weight change ΔW of the adapter types that are not plain low-rank LoRA, built with PEFT's own math.

A file's LoKr (`lokr_w1` / `lokr_w2`, or their `_a`/`_b` factors), LoHa (`hada_w1_a/b`, `hada_w2_a/b`), DoRA
(`dora_scale`, or PEFT's `lora_magnitude_vector`) and full `.diff` patches land on a Klein Linear as a
`DenseAdapter`: one `FilePart` per source module (a diffusers `to_q` writes only the q rows of the fused `qkv`).
`DenseAdapter.delta(base)` builds ΔW [out, in] at strength 1, exactly as ComfyUI's LoraLoader merges it:

* LoKr: kron(w1, w2) · alpha/dim, where dim is the rank of the factored w1 or w2 (w2's when both are factored);
  with both full matrices, or no `.alpha`, the scale is 1 (ComfyUI and LyCORIS agree);
* LoHa: (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/rank (rank of w1; no `.alpha`: scale 1);
* DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken per output row when the magnitude has one value per output
  (PEFT, LyCORIS `wd_on_out`) and per input column otherwise (LyCORIS' default); the delta is W' − W, so a
  strength or block weight scales W' − W, as ComfyUI does. DoRA needs the model's weight W, so it is built when
  the adapter meets the model, not when the file is read.

The products come from PEFT (`make_kron`, LoHa's `make_weight`, `DoraLinearLayer.get_weight_norm`), imported
inside the functions so that importing the pack stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapters import DenseDelta, LoraWeights

# A file whose output-row DoRA magnitudes are meant for the base weight's row norm (core's LoraLoader divides by
# ‖W‖ there, not by ‖W + ΔW‖): the pack's own DoRA checkpoints say so, with this header key set to "base".
DORA_NORM_KEY = "klein_lab.dora_norm"
LOKR_ROLES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def lokr_shape(t: Mapping[str, Tensor]) -> tuple[int, int]:
    """(out, in) of the Linear a LoKr module fits: w1 [a, b] ⊗ w2 [c, d] is [a·c, b·d]."""
    w1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    w2 = tuple(t["lokr_w2"].shape) if "lokr_w2" in t else (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
    return w1[0] * w2[0], w1[1] * w2[1]


def lokr_scale(t: Mapping[str, Tensor], alpha: float | None) -> float:
    """alpha/dim as ComfyUI's LoKr adapter computes it: dim is the rank of the factored w2, else of w1."""
    dim = None
    if "lokr_w1" not in t:
        dim = t["lokr_w1_b"].shape[0]
    if "lokr_w2" not in t:
        dim = t["lokr_w2_b"].shape[0]
    return alpha / dim if alpha is not None and dim is not None else 1.0


def lokr_delta(t: Mapping[str, Tensor], alpha: float | None) -> Tensor:
    """ΔW [out, in] of a LoKr module (float32)."""
    from peft.tuners.lokr.layer import make_kron

    f = {k: v.float() for k, v in t.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return make_kron(w1, w2, lokr_scale(t, alpha))


def loha_delta(t: Mapping[str, Tensor], alpha: float | None) -> Tensor:
    """ΔW [out, in] of a LoHa module (float32)."""
    from peft.tuners.loha.layer import make_weight

    f = {k: v.float() for k, v in t.items()}
    scale = alpha / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
    with torch.no_grad():
        return make_weight(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], torch.tensor(scale))


def dora_delta(base: Tensor, delta: Tensor, magnitude: Tensor, norm_of_base: bool = False) -> Tensor:
    """W' − W for DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖ (per output row or per input column, from m's shape).

    norm_of_base: per output row, divide by ‖W‖ instead (core's LoraLoader; the pack's DoRA checkpoints store
    m·‖W‖/‖W + ΔW‖ so that core and this reader both give the trained W')."""
    from peft.tuners.lora.dora import DoraLinearLayer

    norm_of = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm
    base, delta, m = base.float(), delta.float(), magnitude.float()
    if m.ndim == 1 or m.shape[0] == base.shape[0]:  # one magnitude per output row (PEFT, LyCORIS wd_on_out)
        norm = base.norm(dim=1) if norm_of_base else norm_of(base, delta, 1.0)  # [out]
        return (base + delta) * (m.reshape(-1) / norm).unsqueeze(1) - base
    norm = norm_of(base.t(), delta.t(), 1.0)  # [in]: per input column (LyCORIS' default)
    return (base + delta) * (m.reshape(-1) / norm).unsqueeze(0) - base


@dataclass(frozen=True)
class FilePart:
    """One source module of a file, as it lands on rows [row0, row1) of a Klein Linear.

    kind: "lora" (down/up), "lokr", "loha" or "diff"; tensors by role; alpha from the file (None: none given);
    magnitude: DoRA's m, if any; transform: a row reordering the source module needs (diffusers' norm_out).
    """

    source: str
    kind: str
    tensors: Mapping[str, Tensor]
    alpha: float | None
    rows: tuple[int, int]
    magnitude: Tensor | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    norm_of_base: bool = False  # DoRA per output row divided by ‖W‖ (DORA_NORM_KEY)

    def raw_delta(self) -> Tensor:
        """ΔW of this part in the source's row order, before DoRA (float32)."""
        t = self.tensors
        if self.kind == "lokr":
            return lokr_delta(t, self.alpha)
        if self.kind == "loha":
            return loha_delta(t, self.alpha)
        if self.kind == "diff":
            return t["diff"].float()
        down, up = t["down"].float(), t["up"].float()
        alpha = self.alpha if self.alpha is not None else float(down.shape[0])
        return (up @ down) * (alpha / down.shape[0])


@dataclass(frozen=True)
class DenseAdapter:
    """A Klein Linear's non-low-rank adapter read from a file: its parts, and the Linear's (out, in)."""

    parts: tuple[FilePart, ...]
    out_features: int
    in_features: int

    @property
    def needs_base(self) -> bool:
        """True when ΔW depends on the model's weight (DoRA)."""
        return any(p.magnitude is not None for p in self.parts)

    @property
    def kinds(self) -> str:
        names = {p.kind for p in self.parts} | ({"dora"} if self.needs_base else set())
        return "+".join(sorted(names))

    def delta(self, base: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
        """ΔW [out, in] at strength 1 (float32, on `device`); `base` (the Linear's weight) is needed for DoRA."""
        if self.needs_base and base is None:
            raise ValueError("a DoRA adapter needs the model's weight to build its delta.")
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=device)
        for p in self.parts:
            r0, r1 = p.rows
            d = p.raw_delta().to(out.device)
            if p.magnitude is not None:
                rows = base[r0:r1].to(device=out.device, dtype=torch.float32)
                if p.transform is not None:  # the norm is taken in the source's row order
                    rows = p.transform(rows)
                d = dora_delta(rows, d, p.magnitude.to(out.device), p.norm_of_base)
            out[r0:r1] += p.transform(d) if p.transform is not None else d
        return out


def place(
    adapter: LoraWeights | DenseAdapter,
    device: torch.device | str,
    dtype: torch.dtype,
    base: Tensor | None = None,
) -> LoraWeights | DenseDelta:
    """An adapter read from a file, ready for a stack on `device` in `dtype`: a LoRA keeps its low-rank tensors;
    a dense adapter becomes its ΔW, built in float32 and cast once (`base`: the Linear's weight, for DoRA)."""
    if isinstance(adapter, LoraWeights):
        return LoraWeights(
            adapter.down.to(device=device, dtype=dtype, non_blocking=True),
            adapter.up.to(device=device, dtype=dtype, non_blocking=True),
            adapter.alpha,
        )
    return DenseDelta(adapter.delta(base, device).to(dtype))
