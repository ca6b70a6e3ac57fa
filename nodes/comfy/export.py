"""ComfyUI glue of Save LoRA as…: which adapters to bake (those a MODEL carries from our loaders, a stack, a
file), the model's weights for DoRA, and where the file goes (ComfyUI's first `loras` folder, so every LoRA loader
lists it at once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import folder_paths
from safetensors.torch import save

from ...trainer_core.files.safe_paths import resolve_inside, safe_name
from ...trainer_core.lora.export import (
    BakeSource,
    bake,
    export_metadata,
    export_state_dict,
    to_lora,
)
from ...trainer_core.lora.lora_file import atomic_write_bytes
from ...trainer_core.lora.lora_formats import read_metadata
from ...trainer_core.model.variants import detect_variant
from .forward_loras import LoraSpec, StackItem, forward_loras_of, model_shape, spec_for

EXPORT_SUBFOLDER = "klein_lora_lab"


@dataclass(frozen=True)
class ExportRequest:
    """What the node asks for: extra items beyond what the model carries, the format, rank, name and trigger."""

    items: tuple[StackItem, ...]
    fmt: str
    rank: int
    filename_prefix: str
    trigger: str = ""


def export_folder() -> Path:
    """`<first loras folder>/klein_lora_lab`: exported files show up in every LoRA list."""
    return Path(folder_paths.get_folder_paths("loras")[0]) / EXPORT_SUBFOLDER


def output_path(prefix: str) -> Path:
    """The next free `<prefix>_00001_.safetensors` inside the export folder (the prefix may hold subfolders)."""
    root = export_folder()
    root.mkdir(parents=True, exist_ok=True)
    parts = [safe_name(p, "filename prefix") for p in prefix.replace("\\", "/").split("/") if p.strip()]
    if not parts:
        raise ValueError("filename_prefix is empty: give a name such as 'my_style'.")
    folder = resolve_inside("/".join(parts[:-1]) or ".", [root], "filename prefix", base=root)
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while (folder / f"{parts[-1]}_{n:05d}_.safetensors").exists():
        n += 1
    return folder / f"{parts[-1]}_{n:05d}_.safetensors"


def export_specs(model, items: Sequence[StackItem]) -> list[LoraSpec]:
    """The LoRAs the model carries (from our loaders / mixer) followed by `items`, read for this model."""
    carried = forward_loras_of(model)
    shape = model_shape(model)
    return [*(carried.specs if carried else ()), *(spec_for(item, shape, "cpu")[0] for item in items if item.strength)]


def save_lora_as(model, request: ExportRequest) -> tuple[str, str]:
    """Bake, resize and write the file; returns (its name in ComfyUI's loras list, a report for the node)."""
    path = output_path(request.filename_prefix)  # a bad name fails before any work
    specs = export_specs(model, request.items)
    if not specs:
        raise ValueError(
            "nothing to save: pick a LoRA file, connect a LoRA stack, or connect a model coming out of a Klein "
            "LoRA loader or mixer."
        )
    diffusion_model = model.model.diffusion_model
    sources = [BakeSource(s.label, s.lora.weights, s.strength, s.module_strength) for s in specs]
    resized = to_lora(bake(sources, lambda name: diffusion_model.get_submodule(name).weight), request.rank)
    single = specs[0].lora.path if len(specs) == 1 else None
    source_meta = read_metadata(single) if single is not None else {}
    meta = export_metadata(
        variant=detect_variant(model_shape(model)).name,
        title=path.stem,
        trigger=request.trigger or source_meta.get("klein_lab.trigger", ""),
        resized=resized,
        sources=[f"{s.label} @ {s.strength:g}" for s in specs],
        source_metadata=source_meta,
    )
    atomic_write_bytes(path, save(export_state_dict(resized.weights, request.fmt), metadata=meta))
    name = Path(path.relative_to(Path(folder_paths.get_folder_paths("loras")[0]))).as_posix()
    lines = [f"saved {name} ({request.fmt})", resized.report(), *(f"  {s.label} @ {s.strength:g}" for s in specs)]
    return name, "\n".join(lines)
