"""One run spread over several devices (data parallel): one process per device, each computing its share of every
batch, the LoRA gradients summed over the processes after every step (`torch.distributed`: NCCL between GPUs,
gloo on the CPU).

The run is the single-process run with the same settings: `settings.batch_size` is the effective batch (per-device
batch × devices), the data order, noise, σ and dropout are those of that run, and each process takes its slice of
every batch (shard.py). Losses therefore match the single-process run within float tolerance (the summation order
differs), and the run folder is an ordinary one: it can be resumed alone or on another number of devices.

Rank 0 writes the checkpoints, metrics.jsonl and run.json and reports progress; every rank reads the latest
checkpoint on resume. Cancel (the shared stop event) is read by rank 0 and agreed on by all ranks at the same
step, which rank 0 then checkpoints. NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 in every process.

    train_data_parallel(source, items, settings, run_path, ["cuda:0", "cuda:1"], resume=False)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..runs.runfolder import RunFolder
from .data import TrainItem
from .settings import TrainSettings
from .shard import Shard
from .spawn import (
    DeathPolicy,
    Event,
    ItemsBlob,
    ModelSource,
    QueueCallbacks,
    RunDone,
    WorkerFailed,
    error_text,
    follow_processes,
    start,
    stop_all,
)
from .trainer import TrainCallbacks, train

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}


class _ReadOnlyRun(RunFolder):
    """The run folder as a rank other than 0 sees it: read (resume state, run.json), never written."""

    def update(self, settings: TrainSettings | None = None, **meta: Any) -> None:
        pass

    def append_metrics(self, record) -> None:
        pass

    def save_state(self, step: int, tensors, info) -> Path:
        return self.state_path(step)

    def discard_partial_writes(self) -> list[Path]:
        return []

    def truncate_metrics(self, step: int) -> None:
        pass


@dataclass(frozen=True)
class _RankSetup:
    rank: int
    devices: tuple[str, ...]
    rendezvous: str  # a file:// address every rank meets at
    source: ModelSource
    items: ItemsBlob
    settings: TrainSettings
    run_path: Path
    resume: bool
    empty_context: Tensor | None


def backend_for(devices: Sequence[str]) -> str:
    """NCCL when every device is a GPU, gloo otherwise (the CPU)."""
    return "nccl" if all(torch.device(d).type == "cuda" for d in devices) else "gloo"


def rank_main(setup: _RankSetup, events, stop) -> None:
    """One rank: join the process group, load the model on its device, train its share; rank 0 reports."""
    os.environ.update(NCCL_ENV)
    device = torch.device(setup.devices[setup.rank])
    world = len(setup.devices)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend_for(setup.devices), init_method=setup.rendezvous, rank=setup.rank, world_size=world
        )
        try:
            model = setup.source.load(device)
            items = setup.items.items()
            shard = Shard(setup.rank, world)
            opened = RunFolder.open(setup.run_path)
            run = opened if shard.main else _ReadOnlyRun(opened.path, opened.settings, opened.meta)
            cb = QueueCallbacks(0, events, stop) if shard.main else TrainCallbacks()  # followers: rank 0 decides
            result = train(
                model,
                items,
                setup.settings,
                run,
                cb,
                setup.empty_context,
                device,
                setup.resume,
                shard=shard,
            )
            # Every rank leaves the last collective before any tears the group down: a gloo peer that closes its
            # pairs while the other still reads them can abort that process ("terminate called ...").
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if shard.main:
            last = str(result.last_checkpoint) if result.last_checkpoint else None
            events.put(("done", 0, ",".join(setup.devices), result.steps_done, result.stopped_early, last,
                        result.final_loss, result.notes))  # fmt: skip
    except BaseException as err:
        events.put(("error", setup.rank, str(device), error_text(err)))
        raise


def train_data_parallel(
    source: ModelSource,
    items: Sequence[TrainItem],
    settings: TrainSettings,
    run_path: Path,
    devices: Sequence[str],
    resume: bool = False,
    empty_context: Tensor | None = None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunDone:
    """Train the run in `run_path` (run.json written, `settings` with the effective batch) on `devices`, one
    process each. Returns rank 0's report; raises WorkerFailed when a rank fails (every process is ended).
    `on_event` sees rank 0's ('step', ...) and ('checkpoint', ...) events; `should_stop` is Cancel."""
    if len(devices) < 2:
        raise ValueError(f"data parallel needs two devices or more, got {list(devices)}: train in this process.")
    if settings.batch_size % len(devices):
        raise ValueError(
            f"batch_size {settings.batch_size} (the effective batch) does not split over {len(devices)} devices: "
            f"use a multiple of {len(devices)}, e.g. {len(devices) * max(1, settings.batch_size // len(devices))}."
        )
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    processes: list[mp.Process] = []
    done: RunDone | None = None
    failure = ""
    blob = ItemsBlob.of(items)
    with tempfile.TemporaryDirectory(prefix="klein_lab_dp_") as meeting:
        rendezvous = Path(meeting, "rendezvous").as_uri()
        try:
            for rank in range(len(devices)):
                setup = _RankSetup(
                    rank, tuple(devices), rendezvous, source, blob, settings, run_path, resume, empty_context
                )
                processes.append(
                    start("trainer_core.training.distributed:rank_main", setup, {"events": events, "stop": stop})
                )
            reports, failure = follow_processes(processes, events, stop, RANK_DEATH, on_event, should_stop)
            done = reports.get(0)
        finally:
            stop.set()
            stop_all(processes)
            events.cancel_join_thread()
            events.close()
    if failure or done is None:
        raise WorkerFailed(failure or "the data-parallel run ended without a report from rank 0.")
    return done


# A rank that fails ends the run: the others wait in a collective that never completes.
RANK_DEATH = DeathPolicy(
    terminate=True,
    done_is_final=True,
    error_message=lambda rank, device, text: f"rank {rank} on {device} failed: {text}",
    exit_message=lambda code: f"a rank ended with exit code {code}: the run stopped.",
)
