"""Training runs as the nodes list and open them: run folders with checkpoints, the checkpoints of a run or of
typed LoRA files as `Checkpoint`s of ComfyUI's loras list, and an existing run opened by name."""

from __future__ import annotations

from pathlib import Path

from ...trainer_core.analysis.scrub import Checkpoint, ScrubError, select_checkpoints
from ...trainer_core.errors import shown
from ...trainer_core.files.safe_paths import resolve_inside
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from .paths import lora_list, lora_list_name, register_runs_folder, runs_dir

FILES_OPTION = "(LoRA files below)"


def checkpoint_files(folder: Path) -> dict[int, Path]:
    """step -> LoRA checkpoint file of a run folder (run.json is not needed to scrub)."""
    out = {}
    ckpt_dir = folder / "checkpoints"
    if ckpt_dir.is_dir():
        for path in ckpt_dir.glob("step_*.safetensors"):
            try:
                out[checkpoint_step(path)] = path
            except ValueError:
                continue  # not a checkpoint name (e.g. step_x.safetensors copied in by hand)
    return out


def runs_with_checkpoints() -> list[str]:
    """Run folders under <output>/klein_lora_lab/runs that hold at least one checkpoint, newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_files(p)]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)]


def runs_with_settings() -> list[str]:
    """Runs with checkpoints (newest first) that also have a run.json (settings and trigger are read from it);
    the file is only checked for existence: a damaged run.json must not keep a node from registering."""
    return [name for name in runs_with_checkpoints() if (runs_dir() / name / "run.json").is_file()]


def run_folder(run: str) -> Path:
    """The folder of a run name, resolved inside the runs folder (no '..', absolute path or symlink out)."""
    root = register_runs_folder()
    return resolve_inside(run, [root], "run", base=root)


def open_existing_run(run: str) -> RunFolder:
    """An existing run by name, for reading (diagnostics, sweet spot)."""
    return RunFolder.open(run_folder(run))


def run_checkpoints(run: str, selection: str) -> list[Checkpoint]:
    """The selected checkpoints of a run (ascending steps) as names of ComfyUI's loras list."""
    files = checkpoint_files(run_folder(run))
    try:
        steps = select_checkpoints(selection, sorted(files))
    except ScrubError as err:
        raise ScrubError(f"run '{run}': {err}") from err
    return [Checkpoint(lora_list_name(files[s]), s) for s in steps]


def file_checkpoints(text: str) -> list[Checkpoint]:
    """LoRA files of the loras list, one per line, in the order given (steps read from step_000600 names)."""
    register_runs_folder()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ScrubError(f"run is '{FILES_OPTION}' but lora_files is empty: list one LoRA of the loras list per line.")
    known = set(lora_list())
    out = []
    for name in dict.fromkeys(names):
        if name not in known:
            raise ScrubError(
                f"{shown(name)} is not in ComfyUI's loras list: copy the name from a LoRA loader's list "
                "(e.g. 'my_run/checkpoints/step_000600.safetensors') or put the file into models/loras."
            )
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        try:
            step = checkpoint_step(base)
        except ValueError:
            step = None
        out.append(Checkpoint(name, step))
    return out
