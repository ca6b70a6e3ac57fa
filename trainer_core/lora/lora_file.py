"""Our LoRA file format (DESIGN.md §5.3): what core's stock LoraLoader reads with zero unmatched keys.

Tensors, for every target module X (a name relative to the diffusion model):
    diffusion_model.X.lora_A.weight  [rank, in]   (down)
    diffusion_model.X.lora_B.weight  [out, rank]  (up)
    diffusion_model.X.alpha          scalar        (ComfyUI and PEFT scale the delta by alpha / rank)
Safetensors metadata: `klein_lab.*` keys (format, base model variant, rank, alpha, targets, step, lr, trigger,
dataset hash, loss, ...) plus the common `ss_network_dim` / `ss_network_alpha` / `ss_network_module` keys.

Readers for every other key style live in lora_formats.py; `load_lora` here reads only this format, exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..files.atomic import DiskFullError as DiskFullError  # re-exported: the writer moved to files/atomic.py
from ..files.atomic import atomic_write_bytes
from ..files.atomic import disk_full_error as disk_full_error
from ..files.atomic import is_disk_full as is_disk_full
from .adapters import LoraWeights, check_lora_weights

PREFIX = "diffusion_model."
FORMAT = "klein_lab.lora.v1"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")


def unreadable_message(path: Path, err: Exception) -> str:
    """The error text for a file that safetensors cannot parse: truncated (an interrupted copy or download) or
    not a safetensors file at all."""
    size = path.stat().st_size if path.is_file() else 0
    return (
        f"{path.name} is truncated or not a safetensors file ({size} bytes; {err}). Fix: copy or download it "
        "again (an interrupted transfer leaves a cut file), or pick another file."
    )


def lora_state_dict(weights: Mapping[str, LoraWeights], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the file: our key names, contiguous CPU tensors (in `dtype` when given); alpha fp32."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name.startswith(PREFIX):
            raise ValueError(f"module name {name!r} must be relative to the diffusion model (no '{PREFIX}').")
        out[f"{PREFIX}{name}.lora_A.weight"] = w.down.detach().to("cpu", dtype or w.down.dtype).contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = w.up.detach().to("cpu", dtype or w.up.dtype).contiguous()
        out[f"{PREFIX}{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def save_lora(
    path: str | os.PathLike[str],
    weights: Mapping[str, LoraWeights],
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> None:
    """Write a LoRA file atomically. `metadata` values must be strings; format and ss_network_* are added."""
    if not weights:
        raise ValueError(f"refusing to write {path}: the LoRA has no modules.")
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str) or not isinstance(k, str)}
    if bad:
        raise TypeError(f"LoRA metadata must map str to str; these keys are not: {bad} (use json.dumps / str).")
    for name, w in weights.items():
        if not (torch.isfinite(w.down).all() and torch.isfinite(w.up).all()):
            raise ValueError(f"refusing to write {path}: LoRA weights of {name!r} contain NaN or Inf.")
    ranks = {w.rank for w in weights.values()}
    alphas = {float(w.alpha) for w in weights.values()}
    meta = {
        "klein_lab.format": FORMAT,
        "ss_network_module": "networks.lora",
        **({"ss_network_dim": str(ranks.pop())} if len(ranks) == 1 else {}),
        **({"ss_network_alpha": f"{alphas.pop():g}"} if len(alphas) == 1 else {}),
        **metadata,
    }
    atomic_write_bytes(path, save(lora_state_dict(weights, dtype), metadata=meta))


def save_adapter_file(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], file_format: str
) -> None:
    """Write an adapter file whose tensors are already keyed (LoKr, DoRA: see peft_trainable.file_tensors)
    atomically; refuses NaN/Inf tensors like `save_lora`. `metadata` values must be strings."""
    if not tensors:
        raise ValueError(f"refusing to write {path}: the adapter has no tensors.")
    bad = sorted(k for k, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"refusing to write {path}: tensor {bad[0]!r} contains NaN or Inf.")
    meta = {"klein_lab.format": file_format, **metadata}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("adapter metadata must map str to str (use json.dumps / str).")
    atomic_write_bytes(path, save(dict(tensors), metadata=meta))


def load_lora(path: str | os.PathLike[str]) -> tuple[dict[str, LoraWeights], dict[str, str]]:
    """Read a file written by `save_lora`: module name -> LoraWeights (as stored), and the metadata.

    Any key outside our format is an error naming it (other formats: lora_formats.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(unreadable_message(path, err)) from err
    bad = sorted(key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise ValueError(
            f"{path.name}: tensor {bad[0]!r} holds NaN/Inf values ({len(bad)} tensor(s) in all): the LoRA is broken "
            "(its training diverged). Fix: use an earlier checkpoint of the run or train again with a lower lr."
        )
    names: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(
                f"{path.name}: key {key!r} is not in Klein LoRA Lab's format "
                f"('{PREFIX}<module>.lora_A.weight/.lora_B.weight/.alpha'); read other formats with lora_formats."
            )
        names.setdefault(key[len(PREFIX) : -len(suffix)], {})[suffix] = tensor
    weights = {}
    for name, parts in names.items():
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise ValueError(f"{path.name}: module {name!r} lacks lora_A or lora_B.")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        # No alpha means scale 1 in ComfyUI (alpha = rank).
        alpha = float(parts[".alpha"].item()) if ".alpha" in parts else float(down.shape[0])
        weights[name] = LoraWeights(down, up, alpha)
    check_lora_weights(weights, path.name)  # rank 0, absurd alpha/weights: refused by file and module
    return weights, metadata
