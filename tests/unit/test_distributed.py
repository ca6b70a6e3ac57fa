"""One run on several devices (data parallel, gloo on the CPU): the same run as one process with the same
effective batch, checkpoints written once, resume on every rank."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.tiny import TinySource, TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.distributed import train_data_parallel
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.shard import Shard
from klein_lora_lab.trainer_core.training.spawn import WorkerFailed
from klein_lora_lab.trainer_core.training.trainer import train

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
# Effective batch 4 = 2 per process x 2 processes; accumulation and caption dropout in play.
SETTINGS = dict(
    rank=4, alpha=4, learning_rate=5e-3, steps=4, checkpoint_every=2, save_dtype="fp32", batch_size=4, grad_accum=2,
    caption_dropout=0.3,
)  # fmt: skip
EMPTY = torch.zeros(2, 16)


def _items() -> list[TrainItem]:
    """Two buckets (3 and 2 items): batches of 3 and 2 leave the second process 1 item or none."""
    g = torch.Generator().manual_seed(7)
    sizes = [(2, 2)] * 3 + [(2, 3)] * 2
    return [
        TrainItem(torch.randn(128, *hw, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}")
        for i, hw in enumerate(sizes)
    ]


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in RunFolder.open(path).read_metrics()]


def _alone(path: Path, settings: TrainSettings) -> RunFolder:
    run = RunFolder.create(path, settings, {})
    train(tiny_klein(SPEC), _items(), settings, run, empty_context=EMPTY)
    return run


def test_shard_parts_cover_every_batch_once() -> None:
    """The parts of the ranks tile every batch in order, the last ranks getting fewer items of a short batch."""
    for batch in range(1, 9):
        parts = [Shard(r, 2).part(batch, 8) for r in range(2)]
        assert [i for p in parts for i in range(batch)[p]] == list(range(batch))
    assert Shard(1, 2).part(3, 4) == slice(2, 3) and Shard(1, 2).part(2, 4) == slice(2, 2)


def test_two_processes_match_one_process_with_the_effective_batch(tmp_path: Path) -> None:
    """Two gloo processes with 2 items each give, step by step, the losses of one process with batch 4 (within
    float tolerance) and the same final LoRA; rank 0 alone wrote metrics (one record per step) and checkpoints."""
    settings = TrainSettings(**SETTINGS)
    _alone(tmp_path / "alone", settings)
    RunFolder.create(tmp_path / "dp", settings, {})
    events: list[tuple] = []
    done = train_data_parallel(
        TinySource(SPEC), _items(), settings, tmp_path / "dp", ["cpu", "cpu"], empty_context=EMPTY,
        on_event=events.append,
    )  # fmt: skip
    assert multiprocessing.active_children() == []
    assert done.steps_done == 4 and not done.stopped_early
    assert [e[2] for e in events if e[0] == "step"] == [1, 2, 3, 4]
    assert [r["step"] for r in RunFolder.open(tmp_path / "dp").read_metrics()] == [1, 2, 3, 4]
    assert _losses(tmp_path / "dp") == pytest.approx(_losses(tmp_path / "alone"), rel=1e-5, abs=1e-7)
    dp, _ = load_lora(done.last_checkpoint)
    alone, _ = load_lora(RunFolder.open(tmp_path / "alone").latest_checkpoint())
    for name, w in alone.items():
        torch.testing.assert_close(dp[name].up, w.up, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dp[name].down, w.down, rtol=1e-4, atol=1e-6)
    assert [p.name for p in RunFolder.open(tmp_path / "dp").checkpoints()] == [
        p.name for p in RunFolder.open(tmp_path / "alone").checkpoints()
    ]


def test_data_parallel_resume_continues_the_run(tmp_path: Path) -> None:
    """A run trained 2 steps alone and resumed to 4 steps on two processes (every rank reads the checkpoint)
    ends with the losses of a run trained 4 steps alone."""
    settings = TrainSettings(**SETTINGS)
    _alone(tmp_path / "alone", settings)
    _alone(tmp_path / "dp", TrainSettings(**{**SETTINGS, "steps": 2}))
    done = train_data_parallel(
        TinySource(SPEC), _items(), settings, tmp_path / "dp", ["cpu", "cpu"], resume=True, empty_context=EMPTY
    )
    assert multiprocessing.active_children() == []
    assert done.steps_done == 4
    assert _losses(tmp_path / "dp") == pytest.approx(_losses(tmp_path / "alone"), rel=1e-5, abs=1e-7)


def test_batch_that_does_not_split_is_refused(tmp_path: Path) -> None:
    """An effective batch that is not a multiple of the device count is refused before any process starts."""
    settings = TrainSettings(**{**SETTINGS, "batch_size": 3})
    with pytest.raises(ValueError, match="multiple of 2"):
        train_data_parallel(TinySource(SPEC), _items(), settings, tmp_path / "x", ["cpu", "cpu"])


def test_cancel_stops_every_rank_at_the_same_step_and_keeps_it(tmp_path: Path) -> None:
    """Cancel seen by the launcher after step 2 stops both ranks at one step (no rank waits forever in a
    collective); rank 0 checkpoints that step, the run is 'stopped' and resumable, no process stays."""
    settings = TrainSettings(**{**SETTINGS, "steps": 400, "checkpoint_every": 0})
    RunFolder.create(tmp_path / "dp", settings, {})
    seen: list[int] = []

    def on_event(event: tuple) -> None:
        if event[0] == "step":
            seen.append(event[2])

    done = train_data_parallel(
        TinySource(SPEC), _items(), settings, tmp_path / "dp", ["cpu", "cpu"], empty_context=EMPTY,
        on_event=on_event, should_stop=lambda: len(seen) >= 2,
    )  # fmt: skip
    assert multiprocessing.active_children() == []
    run = RunFolder.open(tmp_path / "dp")
    assert done.stopped_early and 2 <= done.steps_done < 400
    assert checkpoint_step(run.latest_resumable()) == done.steps_done and run.meta["status"] == "stopped"
    assert [r["step"] for r in run.read_metrics()] == list(range(1, done.steps_done + 1))


class _RankZeroCannotLoad:
    """Rank 0's copy of the model fails to load (e.g. out of memory on its GPU); the other rank's loads and then
    waits for rank 0 in the first collective."""

    def load(self, device: torch.device):
        import torch.distributed as dist

        if dist.get_rank() == 0:
            raise MemoryError("no room for the model on rank 0")
        return tiny_klein(SPEC)


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path: Path) -> None:
    """When one rank fails while the other waits in a collective, the launcher reports that rank's error and ends
    every process (none is left waiting); the run folder keeps no checkpoint."""
    settings = TrainSettings(**SETTINGS)
    RunFolder.create(tmp_path / "dp", settings, {})
    with pytest.raises(WorkerFailed, match="rank 0 on cpu failed: MemoryError: no room"):
        train_data_parallel(
            _RankZeroCannotLoad(), _items(), settings, tmp_path / "dp", ["cpu", "cpu"], empty_context=EMPTY
        )
    assert multiprocessing.active_children() == []
    assert RunFolder.open(tmp_path / "dp").checkpoints() == []
