"""Sweep runs on several devices: worker processes train the runs of a sweep exactly as a run trained alone."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.tiny import TinySource, TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.spawn import ItemsBlob, WorkerFailed, parse_devices
from klein_lora_lab.trainer_core.training.trainer import train
from klein_lora_lab.trainer_core.training.workers import RunJob, train_runs_on_devices

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
BASE = dict(rank=4, alpha=4, steps=4, checkpoint_every=2, save_dtype="fp32", batch_size=2)


def _items(n: int = 4) -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}") for i in range(n)
    ]


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in RunFolder.open(path).read_metrics()]


def _no_children_left() -> None:
    assert multiprocessing.active_children() == []


@pytest.fixture
def one_thread():
    """One intra-op thread here and in the workers (they take this process's count): CPU float sums are
    reproducible across processes only at a fixed split, and two workers with two threads each on a 2-core
    machine do not keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_workers_train_runs_bit_identical_to_runs_trained_alone(tmp_path: Path, one_thread) -> None:
    """Three runs of a learning-rate sweep on two CPU workers give, run by run, exactly the losses and LoRA
    weights of the same run trained alone in this process; every run lands in its own folder, no process stays."""
    items = _items()
    settings = [TrainSettings(**BASE, learning_rate=lr) for lr in (1e-3, 5e-3, 2e-2)]
    jobs = []
    for i, s in enumerate(settings):
        RunFolder.create(tmp_path / f"w{i}", s, {})
        jobs.append(RunJob(i, tmp_path / f"w{i}", s, resume=False))
    events: list[tuple] = []
    done = train_runs_on_devices(jobs, ["cpu", "cpu"], TinySource(SPEC), items, on_event=events.append)
    _no_children_left()
    assert [d.key for d in done] == [0, 1, 2] and all(d.steps_done == 4 and not d.stopped_early for d in done)
    assert {e[2] for e in events if e[0] == "started"} == {"cpu"}
    assert sorted(e[1] for e in events if e[0] == "step" and e[2] == 4) == [0, 1, 2]
    for i, s in enumerate(settings):
        alone = RunFolder.create(tmp_path / f"a{i}", s, {})
        train(tiny_klein(SPEC), items, s, alone)
        assert _losses(tmp_path / f"w{i}") == _losses(tmp_path / f"a{i}")
        worker_lora, _ = load_lora(tmp_path / f"w{i}" / "checkpoints" / done[i].last_checkpoint.name)
        alone_lora, _ = load_lora(alone.latest_checkpoint())
        for name, w in alone_lora.items():
            assert torch.equal(w.up, worker_lora[name].up) and torch.equal(w.down, worker_lora[name].down)


def test_cancel_stops_every_worker_and_keeps_their_checkpoints(tmp_path: Path) -> None:
    """Cancel during the first steps stops both workers at their next step; each run keeps a checkpoint of the
    step it stopped at (resumable), the third run is never started, and no process stays behind."""
    items = _items()
    s = TrainSettings(**{**BASE, "steps": 400, "checkpoint_every": 0}, learning_rate=1e-3)
    jobs = []
    for i in range(3):
        RunFolder.create(tmp_path / f"r{i}", s, {})
        jobs.append(RunJob(i, tmp_path / f"r{i}", s, resume=False))
    steps: set[int] = set()

    def on_event(event: tuple) -> None:
        if event[0] == "step":
            steps.add(event[1])

    done = train_runs_on_devices(
        jobs, ["cpu", "cpu"], TinySource(SPEC), items, on_event=on_event, should_stop=lambda: steps == {0, 1}
    )
    _no_children_left()
    assert [d.key for d in done] == [0, 1]
    for d in done:
        assert d.stopped_early and 0 < d.steps_done < 400
        run = RunFolder.open(tmp_path / f"r{d.key}")
        assert run.latest_resumable() is not None and run.meta["status"] == "stopped"
    assert not (tmp_path / "r2" / "metrics.jsonl").exists() or _losses(tmp_path / "r2") == []


def test_a_failing_worker_is_reported_and_ended(tmp_path: Path) -> None:
    """A run a worker cannot train (its folder already has checkpoints and resume is off) fails with the worker's
    error in the message; the pool ends every process."""
    s = TrainSettings(**BASE, learning_rate=1e-3)
    run = RunFolder.create(tmp_path / "x", s, {})
    train(tiny_klein(SPEC), _items(), s, run)
    with pytest.raises(WorkerFailed, match="already has checkpoints"):
        train_runs_on_devices([RunJob(0, tmp_path / "x", s, False)], ["cpu"], TinySource(SPEC), _items())
    _no_children_left()


def test_devices_text() -> None:
    """The devices widget: empty means this process, a list names devices, a typo is refused with the fix."""
    assert parse_devices("") == [] and parse_devices(" cpu, cpu ") == ["cpu", "cpu"]
    assert parse_devices("auto") == ([] if torch.cuda.device_count() < 2 else parse_devices("auto"))
    with pytest.raises(ValueError, match="not a device"):
        parse_devices("gpu0")


class _BrokenSource:
    """A model source whose file is gone (picklable: defined at module level)."""

    def load(self, device: torch.device):
        raise FileNotFoundError("tiny.safetensors was moved")


def test_a_model_that_does_not_load_fails_the_pool(tmp_path: Path) -> None:
    """A worker that cannot load its model reports it; the pool raises with the cause and ends every process,
    and the runs stay as they were (run.json only)."""
    s = TrainSettings(**BASE, learning_rate=1e-3)
    RunFolder.create(tmp_path / "y", s, {})
    with pytest.raises(WorkerFailed, match="loading the model.*was moved"):
        train_runs_on_devices([RunJob(0, tmp_path / "y", s, False)], ["cpu"], _BrokenSource(), _items())
    _no_children_left()
    assert RunFolder.open(tmp_path / "y").checkpoints() == []


def test_items_travel_whole_even_as_views_of_one_batch() -> None:
    """Items whose tensors are views of one encoded batch (as the encoder's cache hands them out) reach a worker
    with the same values, shapes, references and names."""
    batch = torch.randn(3, 128, 2, 2)
    refs = torch.randn(3, 128, 2, 2)
    items = [TrainItem(batch[i], batch[i, :3, 0], (refs[i],), name=f"v{i}") for i in range(3)]
    back = ItemsBlob.of(items).items()
    for a, b in zip(items, back, strict=True):
        assert a.name == b.name and torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
        assert len(b.refs) == 1 and torch.equal(a.refs[0], b.refs[0])
