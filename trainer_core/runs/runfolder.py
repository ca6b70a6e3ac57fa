"""A training run on disk (DESIGN.md §5.6). Every write is atomic; nothing is pickled.

    <run>/run.json                               settings + meta (variant, targets, dataset hash, status, ...)
    <run>/metrics.jsonl                          one JSON object per line: step, loss, lr, seconds, val_loss, ...
    <run>/checkpoints/step_000500.safetensors    the LoRA at step 500 (lora_file format, loads in LoraLoader)
    <run>/checkpoints/step_000500.state          resume state: fp32 master weights, optimizer state (tensors)
                                                 and a JSON description, in safetensors format. Its suffix is
                                                 not a model extension, so ComfyUI's `loras` list (which holds
                                                 the runs folder) never offers it as a LoRA.
    <run>/per_image.jsonl                        one JSON object per validation: each album item's loss at the
                                                 validation σ with the LoRA and with the base model
    <run>/samples/                               validation previews written by the nodes

The state file is written before its LoRA file, so every checkpoint that is visible can be resumed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import pack_error, shown
from ..files.atomic import atomic_write_bytes, disk_full_error, is_disk_full
from ..files.safe_paths import child_path, confined_file
from ..training.settings import TrainSettings

RUN_FORMAT = "klein_lab.run.v1"
PER_IMAGE_FILE = "per_image.jsonl"
_CKPT_RE = re.compile(r"^step_(\d+)\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.tmp$")  # atomic_write_bytes' temporary files


def _cut_torn_tail(path: Path) -> None:
    """Truncate `path` after its last newline when its last byte is not one (a line torn by a crash)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 4096)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                if start + cut + 1 < size:
                    f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


@pack_error
class RunFolderError(ValueError):
    """A run folder whose files cannot be used as they are (damaged run.json, metrics or resume state, or
    checkpoints without run.json); the message names the file and the fix."""


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint file name `step_000500.safetensors`."""
    m = _CKPT_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint file name (step_000500.safetensors).")
    return int(m.group(1))


class RunFolder:
    """One run: settings, metadata, checkpoints with their resume state, samples and metrics."""

    def __init__(self, path: Path, settings: TrainSettings, meta: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.meta = meta
        self._tail_checked: set[Path] = set()  # JSONL files whose torn tail this process has already cut

    # -- creation -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], settings: TrainSettings, meta: Mapping[str, Any]) -> RunFolder:
        """Start a new run in `path` (created if needed); refuses a folder that already holds a run."""
        path = Path(path)
        cls(path, settings, {})._check_layout()
        if (path / "run.json").exists():
            raise FileExistsError(
                f"{path} already holds a run (run.json exists): open it with RunFolder.open to resume, "
                "or choose a new folder."
            )
        run = cls(path, settings, dict(meta))
        if run.checkpoints_dir.is_dir() and any(
            _CKPT_RE.match(p.name) or p.name.endswith(".state") for p in run.checkpoints_dir.iterdir()
        ):
            # Writing a new run.json here would pair new settings with old checkpoints: a later resume then fails
            # on their shapes and neither the old nor the new settings resume any more.
            raise RunFolderError(
                f"{path} has checkpoints but no run.json (it was deleted or lost), so its settings are unknown and "
                "nothing was written. Fix: restore run.json from a backup to resume it, or give a new run name "
                f"(the checkpoints in {run.checkpoints_dir} still load as LoRAs)."
            )
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        run.samples_dir.mkdir(parents=True, exist_ok=True)
        run._write_run_json()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunFolder:
        """Open an existing run; raises naming the folder when it has no run.json."""
        path = Path(path)
        run_json = path / "run.json"
        cls(path, TrainSettings(), {})._check_layout()
        if not run_json.is_file():
            raise FileNotFoundError(f"{path} is not a run folder: it has no run.json (start it with create).")
        fix = (
            "Fix: restore run.json from a backup to resume this run, or give a new run name (its checkpoints "
            "still load as LoRAs)."
        )
        try:
            data = json.loads(run_json.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunFolderError(f"{run_json} is damaged: it is not JSON ({shown(str(err))}). {fix}") from err
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise RunFolderError(f"{run_json} is damaged: it has no 'settings' object. {fix}")
        if data.get("format") != RUN_FORMAT:
            raise RunFolderError(f"{run_json}: format {shown(data.get('format'))} is not {RUN_FORMAT!r}. {fix}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise RunFolderError(f"{run_json} is damaged: 'meta' is not an object. {fix}")
        try:
            settings = TrainSettings.from_json(data["settings"])
        except (TypeError, ValueError) as err:
            raise RunFolderError(f"{run_json} holds settings this run cannot use: {err} {fix}") from err
        return cls(path, settings, dict(meta))

    def _check_layout(self) -> None:
        """Refuse a run folder whose files or subfolders are symlinks leading out of it: every write of the run
        (checkpoints, samples, metrics, run.json) must land inside the folder the user chose."""
        files = (self.path / "run.json", self.metrics_path, self.per_image_path)
        for entry in (*files, self.checkpoints_dir, self.samples_dir):
            child_path(self.path, entry.name, what=f"run folder entry of {self.path}")

    def _write_run_json(self) -> None:
        data = {"format": RUN_FORMAT, "settings": self.settings.to_dict(), "meta": self.meta}
        atomic_write_bytes(self.path / "run.json", (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def update(self, settings: TrainSettings | None = None, **meta: Any) -> None:
        """Change settings and/or meta entries (status, ...) and rewrite run.json atomically."""
        if settings is not None:
            self.settings = settings
        self.meta.update(meta)
        self._write_run_json()

    # -- layout -------------------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def per_image_path(self) -> Path:
        return self.path / PER_IMAGE_FILE

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}.state"

    def sample_path(self, step: int, name: str) -> Path:
        """Where a validation preview of `step` goes, e.g. sample_path(500, 'prompt0.png')."""
        return self.samples_dir / f"step_{step:06d}_{name}"

    def checkpoints(self) -> list[Path]:
        """LoRA checkpoint files sorted by step."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if _CKPT_RE.match(p.name)]
        for path in found:  # a checkpoint linked in from outside the run is refused, never loaded
            confined_file(path, [self.path], f"checkpoint of run {self.path.name}")
        return sorted(found, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        files = self.checkpoints()
        return files[-1] if files else None

    def latest_resumable(self) -> Path | None:
        """The latest checkpoint that has its resume state next to it."""
        for path in reversed(self.checkpoints()):
            if self.state_path(checkpoint_step(path)).is_file():
                return path
        return None

    # -- resume state -------------------------------------------------------------------------------------

    def save_state(self, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
        """Atomically write the resume state of `step`: tensors + JSON `info` (in the safetensors metadata)."""
        path = self.state_path(step)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(path, save(data, metadata={"klein_lab.state": json.dumps(dict(info), sort_keys=True)}))
        return path

    def load_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The resume state of `step`; RunFolderError naming the file when it is truncated or damaged."""
        path = self.state_path(step)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: checkpoint {step} cannot be resumed exactly.")
        confined_file(path, [self.path], f"resume state of run {self.path.name}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                info = json.loads((f.metadata() or {})["klein_lab.state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, json.JSONDecodeError, KeyError, TypeError) as err:
            why = f"no '{err.args[0]}' entry" if isinstance(err, KeyError) else shown(str(err))
            raise RunFolderError(f"{path.name} is truncated or damaged ({why}).") from err
        if not isinstance(info, dict) or not isinstance(info.get("param_groups"), list):
            raise RunFolderError(f"{path.name} is damaged (its description has no optimizer settings).")
        return tensors, info

    def check_checkpoint(self, step: int) -> None:
        """RunFolderError unless the LoRA file of `step` opens as safetensors (a hand-damaged or cut file)."""
        path = self.checkpoint_path(step)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if not list(f.keys()):
                    raise RunFolderError(f"{path.name} holds no tensors.")
        except (SafetensorError, OSError) as err:
            raise RunFolderError(f"{path.name} is truncated or damaged ({shown(str(err))}).") from err

    # -- metrics ------------------------------------------------------------------------------------------

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record to metrics.jsonl (see _append_line)."""
        self._append_line(self.metrics_path, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records. A torn last line (a crash during a write) is ignored; a bad line elsewhere is an error."""
        return self._read_lines(self.metrics_path, "the loss curve loses one point")

    def append_per_image(self, record: Mapping[str, Any]) -> None:
        """Append one validation's per-image losses to per_image.jsonl (see _append_line)."""
        self._append_line(self.per_image_path, record)

    def read_per_image(self) -> list[dict[str, Any]]:
        """Every validation's per-image record, in order (a torn last line is ignored)."""
        return self._read_lines(self.per_image_path, "the per-image list loses one validation")

    def _append_line(self, path: Path, record: Mapping[str, Any]) -> None:
        """Append one JSON line (a single O_APPEND write, then fsync). A torn last line left by a crash is cut
        off first, so the new record starts on its own line instead of gluing onto the fragment."""
        line = (json.dumps(dict(record), sort_keys=True, allow_nan=True) + "\n").encode()
        if path not in self._tail_checked:  # once per process: only a crash of an earlier process leaves a torn line
            _cut_torn_tail(path)
            self._tail_checked.add(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        except OSError as err:
            # A short line may be on disk: cut it off next time (_cut_torn_tail), report the full disk now.
            self._tail_checked.discard(path)
            raise (disk_full_error(path, len(line), err) if is_disk_full(err) else err) from err
        finally:
            os.close(fd)

    def _read_lines(self, path: Path, loss: str) -> list[dict[str, Any]]:
        """The records of a JSONL file of this run; `loss` says what deleting a damaged line costs."""
        if not path.is_file():
            return []
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()
        records = []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if n == len(lines) - 1:
                    break
                raise RunFolderError(
                    f"{path}: line {n + 1} is damaged (not JSON: {shown(str(err))}). Fix: delete that "
                    f"line in a text editor ({loss}), then queue again."
                ) from err
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise RunFolderError(
                    f"{path}: line {n + 1} is damaged (no integer 'step'). Fix: delete that line in a "
                    f"text editor ({loss}), then queue again."
                )
            records.append(record)
        return records

    def discard_partial_writes(self) -> list[Path]:
        """Delete the temporary files of writes a crash interrupted (`.<name>.<random>.tmp`, never listed as
        checkpoints or LoRAs); call it only while no other process writes to this run. Returns what was removed."""
        removed = []
        for folder in (self.path, self.checkpoints_dir, self.samples_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if _TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                        p.unlink()
                        removed.append(p)
        return removed

    def truncate_metrics(self, step: int) -> None:
        """Keep only records up to `step` (resume from that checkpoint), rewriting the file atomically."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.metrics_path, text.encode())
        if self.per_image_path.is_file():  # the per-image records of the steps a resume trains again go too
            kept = [r for r in self.read_per_image() if r["step"] <= step]
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            atomic_write_bytes(self.per_image_path, text.encode())
