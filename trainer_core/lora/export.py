"""Save LoRA as…: bake one or several adapters (strengths and block weights included) into one plain LoRA file,
optionally resized to a target rank by SVD, in ComfyUI's, diffusers' or kohya/musubi's key style.

Baking is exact: at full rank the file's ΔW of every module equals Σ strength · block weight · ΔW of its sources.
Plain LoRAs stack as concatenated downs and scaled ups (rank = Σ ranks); a module with any dense source (LoKr,
LoHa, DoRA, diff) is summed densely and written through its SVD. A fused qkv read from separate q/k/v adapters is
already the exact block-diagonal LoRA (`lora_formats._combine`), so the diffusers export splits it back row-wise
with the shared down: nothing is approximated unless a target rank asks for it.

Resizing keeps the r largest singular directions of each module's ΔW (the best rank-r approximation in the
Frobenius norm) and reports the energy kept, Σᵢ<r σᵢ² / Σ σᵢ². For a low-rank ΔW = U D the SVD is taken through
QR factors of U and Dᵀ (an R×R problem), never through the dense [out, in] matrix. This is plain linear algebra
that no installed library offers for a LoRA file (PEFT's SVD merge works on a live PEFT model, not on files).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter_math import DenseAdapter
from .adapters import LoraWeights
from .lora_formats import FileAdapter, write_diffusers, write_kohya, write_peft

FORMATS = ("ComfyUI", "diffusers", "kohya")
FORMAT_HELP = {
    "ComfyUI": "diffusion_model.<module>.lora_A/lora_B + .alpha (this pack's and core's style)",
    "diffusers": "transformer.<diffusers name>.lora_A/lora_B, alpha folded in (Flux2KleinPipeline.load_lora_weights)",
    "kohya": "lora_unet_<module>.lora_down/lora_up + .alpha (kohya, musubi-tuner)",
}


@dataclass(frozen=True)
class BakeSource:
    """One adapter file's modules with its strength and per-module multipliers (block weights)."""

    label: str
    weights: Mapping[str, FileAdapter]
    strength: float
    module_strength: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Baked:
    """A module's total weight change: low-rank (down [R, in], up [out, R], scale folded into up) or dense."""

    down: Tensor | None
    up: Tensor  # [out, R], or the dense ΔW [out, in] when down is None

    def delta(self) -> Tensor:
        return self.up if self.down is None else self.up @ self.down


def bake(sources: Sequence[BakeSource], weight_of: Callable[[str], Tensor] | None = None) -> dict[str, Baked]:
    """Every module's total ΔW over the sources, exactly (float32). `weight_of(module)` gives the model's weight
    for DoRA sources."""
    lowrank: dict[str, list[tuple[Tensor, Tensor]]] = {}
    dense: dict[str, Tensor] = {}
    for src in sources:
        for name, adapter in src.weights.items():
            mult = src.strength * (1.0 if src.module_strength is None else src.module_strength.get(name, 1.0))
            if mult == 0.0:
                continue
            if isinstance(adapter, DenseAdapter):
                base = weight_of(name) if adapter.needs_base and weight_of is not None else None
                d = adapter.delta(base, "cpu") * mult
                dense[name] = dense[name] + d if name in dense else d
            else:
                lowrank.setdefault(name, []).append(
                    (adapter.down.float().cpu(), adapter.up.float().cpu() * (adapter.scale * mult))
                )
    out: dict[str, Baked] = {}
    for name in sorted(set(lowrank) | set(dense)):
        pairs = lowrank.get(name, [])
        if name in dense:
            total = dense[name]
            for down, up in pairs:
                total = total + up @ down
            out[name] = Baked(None, total)
        else:
            out[name] = Baked(torch.cat([d for d, _ in pairs], dim=0), torch.cat([u for _, u in pairs], dim=1))
    return out


def _svd_factors(b: Baked) -> tuple[Tensor, Tensor, Tensor]:
    """(U [out, k], S [k], Vh [k, in]) with ΔW = U diag(S) Vh, singular values descending."""
    if b.down is None:
        return torch.linalg.svd(b.up, full_matrices=False)
    qu, ru = torch.linalg.qr(b.up)  # up = Qu Ru
    qd, rd = torch.linalg.qr(b.down.t())  # downᵀ = Qd Rd
    a, s, bh = torch.linalg.svd(ru @ rd.t(), full_matrices=False)  # ΔW = Qu (Ru Rdᵀ) Qdᵀ
    return qu @ a, s, bh @ qd.t()


@dataclass(frozen=True)
class Resized:
    weights: dict[str, LoraWeights]
    energy: dict[str, float]  # module -> share of its ΔW's squared Frobenius norm kept (1.0 = exact)
    overall: float = 1.0  # the same share over all modules together

    @property
    def lowest(self) -> float:
        return min(self.energy.values()) if self.energy else 1.0

    def report(self) -> str:
        ranks = sorted({w.rank for w in self.weights.values()})
        shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        return (
            f"{len(self.weights)} modules, rank {shown}; energy kept {100 * self.overall:.2f}% overall, "
            f"{100 * self.lowest:.2f}% in the weakest-kept module"
        )


def to_lora(baked: Mapping[str, Baked], rank: int = 0, dtype: torch.dtype = torch.float32) -> Resized:
    """Plain LoRAs of the baked modules. rank 0 keeps every module exact (a stack of plain LoRAs stays their
    concatenation; a dense ΔW is written at its numerical rank); rank r keeps the r strongest directions."""
    if rank < 0:
        raise ValueError(f"rank={rank}: use 0 (keep exact) or a positive target rank.")
    weights: dict[str, LoraWeights] = {}
    energy: dict[str, float] = {}
    kept_sum = total_sum = 0.0
    for name, b in baked.items():
        if rank == 0 and b.down is not None:
            weights[name] = LoraWeights(b.down.to(dtype), b.up.to(dtype), float(b.down.shape[0]))
            energy[name] = 1.0
            norm2 = float(torch.trace((b.up.t() @ b.up) @ (b.down @ b.down.t())))  # ‖U D‖² without [out, in]
            kept_sum, total_sum = kept_sum + norm2, total_sum + norm2
            continue
        u, s, vh = _svd_factors(b)
        total = float((s**2).sum())
        if rank == 0:  # exact: every direction above float32 noise
            keep = max(1, int((s > s[0] * 1e-6).sum())) if total > 0 else 1
        else:
            keep = min(rank, s.shape[0])
        kept = float((s[:keep] ** 2).sum())
        energy[name] = kept / total if total > 0 else 1.0
        kept_sum, total_sum = kept_sum + kept, total_sum + total
        up = (u[:, :keep] * s[:keep]).contiguous()
        weights[name] = LoraWeights(vh[:keep].contiguous().to(dtype), up.to(dtype), float(keep))
    return Resized(weights, energy, kept_sum / total_sum if total_sum > 0 else 1.0)


def export_state_dict(weights: Mapping[str, LoraWeights], fmt: str) -> dict[str, Tensor]:
    """The file's tensors in the chosen key style (FORMATS)."""
    if fmt == "ComfyUI":
        return write_peft(weights)
    if fmt == "diffusers":
        return write_diffusers(weights)
    if fmt == "kohya":
        return write_kohya(weights)
    raise ValueError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}.")


# modelspec architecture names for Klein (what LoRA managers group files by); custom sizes keep our own name
MODELSPEC_ARCH = {"klein-4b": "flux-2-klein-4b", "klein-9b": "flux-2-klein-9b"}


def export_metadata(
    *,
    variant: str,
    title: str,
    trigger: str,
    resized: Resized,
    sources: Sequence[str],
    source_metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Header of an exported file: our `klein_lab.*` keys (the source run's settings carried over), a modelspec
    block and kohya `ss_*` keys, which LoRA managers read (base model, trigger, steps, rank, alpha)."""
    src = dict(source_metadata or {})
    ranks = sorted({w.rank for w in resized.weights.values()})
    alphas = sorted({w.alpha for w in resized.weights.values()})
    carried = {k: v for k, v in src.items() if k.startswith("klein_lab.") and k != "klein_lab.format"}
    steps = src.get("klein_lab.step", "")
    arch = MODELSPEC_ARCH.get(variant, f"flux-2-{variant}")
    meta = {
        **carried,
        "klein_lab.base_model": variant,
        "klein_lab.exported_from": json.dumps(list(sources)),
        "klein_lab.energy_kept": f"{resized.overall:.6f}",
        "klein_lab.rank": str(ranks[-1]) if len(ranks) == 1 else json.dumps(ranks),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
        "modelspec.title": title,
        "ss_network_module": "networks.lora",
        "ss_base_model_version": arch.replace("-", "_"),
        "ss_output_name": title,
    }
    if trigger:
        meta["klein_lab.trigger"] = trigger
        meta["modelspec.trigger_phrase"] = trigger
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks[0])
    if len(alphas) == 1:
        meta["ss_network_alpha"] = f"{alphas[0]:g}"
    if steps:
        meta["ss_steps"] = steps
    if "klein_lab.settings" in src:
        meta["ss_training_comment"] = src["klein_lab.settings"]
    return meta
