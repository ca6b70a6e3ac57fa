"""Unit tests of the run folder: layout, run.json, checkpoint listing, resume state, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step
from klein_lora_lab.trainer_core.training.settings import TrainSettings


def test_create_and_open_round_trip(tmp_path: Path) -> None:
    """run.json stores settings and meta; open() gives them back; a second create on the same folder fails."""
    settings = TrainSettings(rank=8, alpha=8, steps=20, targets="binding")
    run = RunFolder.create(tmp_path / "run", settings, {"trigger": "TOK"})
    assert run.checkpoints_dir.is_dir() and run.samples_dir.is_dir()
    again = RunFolder.open(tmp_path / "run")
    assert again.settings == settings and again.meta == {"trigger": "TOK"}
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunFolder.create(tmp_path / "run", settings, {})
    with pytest.raises(FileNotFoundError, match="no run.json"):
        RunFolder.open(tmp_path)
    again.update(status="finished")
    assert RunFolder.open(tmp_path / "run").meta["status"] == "finished"


def test_checkpoints_sort_by_step(tmp_path: Path) -> None:
    """Checkpoints are ordered by step number (not by name), state files are not listed as checkpoints."""
    run = RunFolder.create(tmp_path, TrainSettings(), {})
    for step in (1_000_000, 50, 999_999, 500):
        run.checkpoint_path(step).write_bytes(b"")
    run.state_path(500).write_bytes(b"")
    assert [checkpoint_step(p) for p in run.checkpoints()] == [50, 500, 999_999, 1_000_000]
    assert run.latest_checkpoint() == run.checkpoint_path(1_000_000)
    assert run.latest_resumable() == run.checkpoint_path(500)
    assert run.checkpoint_path(500).name == "step_000500.safetensors"


def test_state_round_trip_without_pickle(tmp_path: Path) -> None:
    """Resume state: tensors come back bit-exact, the info dict through JSON."""
    run = RunFolder.create(tmp_path, TrainSettings(), {})
    tensors = {"opt.0.exp_avg": torch.randn(3, 4), "opt.0.step": torch.tensor(7.0)}
    run.save_state(7, tensors, {"step": 7, "param_groups": [{"lr": 1e-4}]})
    loaded, info = run.load_state(7)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert info == {"step": 7, "param_groups": [{"lr": 1e-4}]}
    assert run.state_path(7).read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_metrics_append_read_truncate(tmp_path: Path) -> None:
    """metrics.jsonl: one record per line; a torn last line is ignored; truncate keeps steps up to a checkpoint."""
    run = RunFolder.create(tmp_path, TrainSettings(), {})
    for step in range(1, 6):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 6, "lo')  # a crash in the middle of a write
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        run.read_metrics()
