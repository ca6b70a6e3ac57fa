"""Folders of the pack under ComfyUI's output folder, the runs folder as an extra `loras` path, and album
folders confined to ComfyUI's input and output folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths

from ...trainer_core.files.safe_paths import resolve_inside

LOG = logging.getLogger("klein_lora_lab")
LAB_FOLDER = "klein_lora_lab"


def lab_output_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / LAB_FOLDER


def runs_dir() -> Path:
    """`<output>/klein_lora_lab/runs`: one folder per training run."""
    return lab_output_dir() / "runs"


def cache_dir() -> Path:
    """`<output>/klein_lora_lab/cache`: encoded latents/conditionings (outside runs/, so never listed as LoRAs)."""
    return lab_output_dir() / "cache"


def register_runs_folder() -> Path:
    """Create the runs folder and add it to ComfyUI's `loras` search paths (idempotent: ComfyUI keeps a path
    once). The extension calls it when the pack loads, so earlier runs' checkpoints are listed from startup."""
    root = runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(root))
    return root


def lora_list() -> list[str]:
    """ComfyUI's `loras` list (the runs' checkpoints included once the runs folder is registered)."""
    return folder_paths.get_filename_list("loras")


def lora_path(lora_name: str) -> Path:
    """Full path of a file of ComfyUI's `loras` list."""
    return Path(folder_paths.get_full_path_or_raise("loras", lora_name))


def lora_list_name(path: Path) -> str:
    """The name under which ComfyUI's `loras` list shows a file of the runs folder (`run/checkpoints/x`)."""
    return Path(os.path.relpath(path, runs_dir())).as_posix()


def output_relative(path: Path) -> tuple[str, str]:
    """(subfolder, filename) of a file under the output folder, as ComfyUI's `/view` and ui images want them."""
    rel = Path(os.path.relpath(path, folder_paths.get_output_directory()))
    return rel.parent.as_posix(), rel.name


def allowed_roots() -> list[Path]:
    """The folders a typed path may point into: ComfyUI's input, output and models folders and every folder the
    user configured for a model type (extra_model_paths.yaml, --base-directory); never custom_nodes (code)."""
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir]
    for kind, (paths, _extensions) in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":
            roots.extend(paths)
    return list(dict.fromkeys(Path(r) for r in roots))


def resolve_album_folder(text: str) -> Path:
    """An album path as typed in a widget: relative to ComfyUI's input folder, or absolute inside an allowed
    folder (safe_paths refuses '..', NUL bytes, over-long names and symlinks that leave those folders)."""
    return resolve_inside(text, allowed_roots(), "album folder", base=folder_paths.get_input_directory())


def folder_fingerprint(*folders: Path) -> str:
    """Names, sizes and modification times of the folders' files: changes when the album changes, so ComfyUI
    re-scans an edited album instead of reusing its cached output."""
    parts = []
    for folder in folders:
        if not folder.is_dir():
            parts.append(f"{folder}:missing")
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                parts.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)
