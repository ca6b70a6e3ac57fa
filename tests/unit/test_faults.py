"""Faults during training: a full disk while saving, an out-of-memory step, a torn metrics line."""

from __future__ import annotations

import errno
import os
import weakref
from pathlib import Path

import pytest
import torch
from harness.callbacks import StopAt
from klein_lora_lab.trainer_core.files.atomic import DiskFullError, atomic_write_bytes
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training import trainer as trainer_module
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.faults import TrainingOutOfMemoryError
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
SETTINGS = TrainSettings(
    rank=16,
    alpha=16,
    learning_rate=1e-3,
    steps=6,
    checkpoint_every=2,
    save_dtype="fp32",
    batch_size=2,
    gradient_checkpointing=False,  # the OOM test turns it on; the others need no recomputation
    mixed_precision="fp32",
)


def _items() -> list[TrainItem]:
    g = torch.Generator().manual_seed(3)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), (), name=f"i{i}")
        for i in range(2)
    ]


def _disk_fills_after(monkeypatch: pytest.MonkeyPatch, good_writes: int) -> None:
    """Every file written through atomic_write_bytes after the first `good_writes` ones gets half its bytes on disk,
    then ENOSPC (as a full disk answers a write)."""
    real_fdopen = os.fdopen
    count = [0]

    class _Full:
        def __init__(self, f) -> None:
            self._f = f

        def write(self, data) -> int:
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._f.__exit__(*exc)

    def fdopen(*args, **kwargs):
        count[0] += 1
        f = real_fdopen(*args, **kwargs)
        return f if count[0] <= good_writes else _Full(f)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while checkpoint 4 is written: the error is a DiskFullError naming the file, saying the disk
    is full and that the last good checkpoint is step 2; step 2 still loads, no partial or orphaned file is left, and
    once space is back the run resumes from step 2 to the end."""
    run = RunFolder.create(tmp_path / "run", SETTINGS, {})
    # Per checkpoint: state, LoRA, run.json. The 4th write from here on is the state of step 4.
    _disk_fills_after(monkeypatch, good_writes=3)
    with pytest.raises(DiskFullError) as info:
        train(tiny_klein(SPEC), _items(), SETTINGS, run)
    message = str(info.value)
    assert "step_000004.state" in message and "disk is full" in message
    assert "last good checkpoint is step_000002.safetensors" in message and "Fix: free disk space" in message
    files = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert files == ["step_000002.safetensors", "step_000002.state"], files
    assert not list(run.path.rglob("*.tmp"))
    load_lora(run.checkpoint_path(2))
    monkeypatch.undo()
    result = train(tiny_klein(SPEC), _items(), SETTINGS, RunFolder.open(run.path), resume=True)
    assert result.steps_done == 6 and result.last_checkpoint == run.checkpoint_path(6)


def test_disk_full_between_state_and_lora_leaves_no_orphan_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the state file fits but the LoRA file of the same step does not, the orphaned state is removed (it
    would only take space: it is never resumed without its LoRA file) and the message names the LoRA file."""
    run = RunFolder.create(tmp_path / "run", SETTINGS, {})
    _disk_fills_after(monkeypatch, good_writes=1)  # the state of step 2 fits; its LoRA file does not
    with pytest.raises(DiskFullError, match=r"step_000002\.safetensors.*disk is full.*last good checkpoint is none"):
        train(tiny_klein(SPEC), _items(), SETTINGS, run)
    assert list(run.checkpoints_dir.iterdir()) == []


def test_atomic_write_disk_full_keeps_old_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while replacing a file leaves the old file as it was and no temporary file next to it."""
    target = tmp_path / "run.json"
    atomic_write_bytes(target, b"old")
    _disk_fills_after(monkeypatch, good_writes=0)
    with pytest.raises(DiskFullError, match="run.json"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_metrics_disk_full_is_named_and_the_torn_line_is_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A metrics append that hits a full disk after half a line raises DiskFullError naming metrics.jsonl; the next
    append starts on a clean line (the fragment is cut), so the file stays readable line by line."""
    run = RunFolder.create(tmp_path / "run", SETTINGS, {})
    run.append_metrics({"step": 1, "loss": 0.5})
    real_write = os.write

    def half_then_full(fd: int, data) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match="metrics.jsonl.*disk is full"):
        run.append_metrics({"step": 2, "loss": 0.4})
    monkeypatch.undo()
    assert [r["step"] for r in run.read_metrics()] == [1]  # the torn line is tolerated when reading
    run.append_metrics({"step": 2, "loss": 0.4})
    assert [r["step"] for r in RunFolder.open(run.path).read_metrics()] == [1, 2]


def test_torn_metrics_line_from_a_crash_is_repaired_on_resume(tmp_path: Path) -> None:
    """A crash in the middle of a metrics line (a fragment without newline at the end) neither breaks reading nor
    resuming: the resumed run's metrics have exactly one record per step."""
    s = TrainSettings(**{**SETTINGS.to_dict(), "steps": 4})
    run = RunFolder.create(tmp_path / "run", s, {})
    train(tiny_klein(SPEC), _items(), s, run, callbacks=StopAt(2))
    with open(run.metrics_path, "ab") as f:
        f.write(b'{"loss": 0.3, "st')
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    train(tiny_klein(SPEC), _items(), s, RunFolder.open(run.path), resume=True)
    assert [r["step"] for r in RunFolder.open(run.path).read_metrics()] == [1, 2, 3, 4]


class _KeepLora(TrainCallbacks):
    def __init__(self) -> None:
        self.lora: weakref.ref | None = None

    def on_validation(self, step: int, lora) -> None:
        self.lora = weakref.ref(lora)


def test_out_of_memory_names_the_fixes_frees_memory_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.OutOfMemoryError in the forward of step 4: TrainingOutOfMemoryError whose message lists the settings
    that reduce memory for this run (checkpointing, batch size, resolution, rank, fp8 weights) and the last good
    checkpoint (step 3, saved on the way out); neither the failed step's tensors nor the LoRA stay referenced by
    the error; run.json says out_of_memory; resume finishes the run."""
    s = TrainSettings(
        **{**SETTINGS.to_dict(), "checkpoint_every": 0, "sample_every": 1, "checkpoint_share": 0.5}
        | {"gradient_checkpointing": True}
    )
    run = RunFolder.create(tmp_path / "run", s, {})
    real_forward = trainer_module.klein_forward
    calls, activations = [0], []

    def forward(*args, **kwargs):
        calls[0] += 1
        out = real_forward(*args, **kwargs)
        if calls[0] == 4:
            big = torch.ones(256, 1024)  # stands in for the activations of the failed step
            activations.append(weakref.ref(big))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return out

    monkeypatch.setattr(trainer_module, "klein_forward", forward)
    keep = _KeepLora()
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(tiny_klein(SPEC), _items(), s, run, callbacks=keep)
    message = str(info.value)
    assert "out of device memory at step 4" in message and "Tried to allocate 2.00 GiB" in message
    for fix in ("checkpoint_share from 0.5 to 1.0", "batch_size from 2 to 1", "32×32", "rank from 16", "fp8"):
        assert fix in message, fix
    assert "last good checkpoint is step_000003.safetensors" in message
    assert info.value.last_checkpoint == run.checkpoint_path(3)
    assert activations and activations[0]() is None, "the failed step's tensors are still referenced"
    assert keep.lora is not None and keep.lora() is None, "the LoRA and its optimizer state are still referenced"
    assert RunFolder.open(run.path).meta["status"] == "out_of_memory"
    monkeypatch.undo()
    result = train(tiny_klein(SPEC), _items(), s, RunFolder.open(run.path), resume=True)
    assert result.steps_done == 6
