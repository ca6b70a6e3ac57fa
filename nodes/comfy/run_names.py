"""Run names typed by the artist or sent by a page: one rule for the Train node and the panel's routes."""

from __future__ import annotations

from pathlib import Path

from ...trainer_core.files.safe_paths import child_path, safe_name
from .paths import runs_dir

RUN_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")


def run_path(run_name: str) -> Path:
    """`<output>/klein_lora_lab/runs/<name>` for a valid run name; raises ValueError (UnsafePathError) naming the
    value and the fix for separators, '..', NUL, reserved or over-long names, other characters, or a symlink
    planted at that name leading out of the runs folder."""
    name = safe_name(run_name, "run name")  # no separators, '..', NUL, reserved or over-long names
    if set(name) - RUN_NAME_CHARS:
        raise ValueError(f"run name {run_name!r}: use letters, digits, spaces, '_', '-' and '.' (e.g. 'tok_style_v1').")
    return child_path(runs_dir(), name, what="run name")  # refuses a symlink leading elsewhere
