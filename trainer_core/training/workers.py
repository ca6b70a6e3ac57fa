"""The runs of a sweep spread over several devices: one worker process per device, each loading the model once
from its source and training run after run through the ordinary `train(...)` path.

A run trained by a worker is the run trained alone: same settings, same items, same seed-derived draws, the same
code; on the CPU with the same thread count its losses and LoRA are bit-identical (tests/unit/test_workers.py).
The parent keeps the bookkeeping (run folders are created before the pool starts); workers write only into the
folder of the run they train. Cancel sets a shared event: every worker stops after its current step, saves the
checkpoint of that step, and takes no further run.

    parent                           worker on cuda:0               worker on cuda:1
    jobs queue  (run 0, 1, 2) ---->  load model, take run 0         load model, take run 1
    events queue <-- step/checkpoint/done --------------------------------------+
    stop event  ---- Cancel ------->  should_stop() at the next step
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor

from ..runs.runfolder import RunFolder
from .data import TrainItem
from .settings import TrainSettings
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
from .trainer import train


@dataclass(frozen=True)
class RunJob:
    """One run for a worker: its key (the sweep index), its folder (run.json already written), its settings."""

    key: int
    path: Path
    settings: TrainSettings
    resume: bool


@dataclass(frozen=True)
class _WorkerSetup:
    device: str
    source: ModelSource
    items: ItemsBlob
    empty_context: Tensor | None


def worker_main(setup: _WorkerSetup, jobs, events, stop) -> None:
    """A worker's life: load the model on its device, train jobs until the sentinel or Cancel. An error is
    reported as ('error', key, device, text) and raised again (the process ends with a failure)."""
    device = torch.device(setup.device)
    key = -1
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = setup.source.load(device)
        items = setup.items.items()
        while not stop.is_set():
            job: RunJob | None = jobs.get()
            if job is None:
                break
            key = job.key
            events.put(("started", key, setup.device))
            run = RunFolder.open(job.path)
            result = train(
                model,
                items,
                job.settings,
                run,
                QueueCallbacks(key, events, stop),
                setup.empty_context,
                device,
                resume=job.resume,
            )
            last = str(result.last_checkpoint) if result.last_checkpoint else None
            done = (key, setup.device, result.steps_done, result.stopped_early, last, result.final_loss, result.notes)
            events.put(("done", *done))
            key = -1
    except BaseException as err:
        events.put(("error", key, setup.device, error_text(err)))
        raise


def train_runs_on_devices(
    jobs: Sequence[RunJob],
    devices: Sequence[str],
    source: ModelSource,
    items: Sequence[TrainItem],
    empty_context: Tensor | None = None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[RunDone]:
    """Train `jobs` on `devices` (one worker each, at most one per job) and return what each run reported, in
    the order of `jobs` (runs not started because of Cancel are missing). `on_event` sees every event of every
    worker in the parent; `should_stop` is polled there (Cancel): it stops every worker at its next step, with
    its checkpoint saved. Raises WorkerFailed when a worker fails (the others are stopped first, keeping their
    checkpoints). No process outlives this call."""
    if not devices:
        raise ValueError("devices is empty: give at least one device for the workers, e.g. ['cuda:0', 'cuda:1'].")
    context = mp.get_context("spawn")
    job_queue, events, stop = context.Queue(), context.Queue(), context.Event()
    for job in jobs:
        job_queue.put(job)
    count = min(len(devices), len(jobs))
    for _ in range(count):
        job_queue.put(None)  # one sentinel per worker: no job left
    blob = ItemsBlob.of(items)
    setup = [_WorkerSetup(d, source, blob, empty_context) for d in devices[:count]]
    processes: list[mp.Process] = []
    done: dict[int, RunDone] = {}
    failure = ""
    try:
        for s in setup:
            processes.append(
                start(
                    "trainer_core.training.workers:worker_main", s, {"jobs": job_queue, "events": events, "stop": stop}
                )
            )
        done, failure = follow_processes(processes, events, stop, WORKER_DEATH, on_event, should_stop)
    finally:
        stop.set()
        stop_all(processes)
        for q in (job_queue, events):
            q.cancel_join_thread()  # items never taken (after Cancel) must not block this process's exit
            q.close()
    if failure:
        raise WorkerFailed(failure)
    return [done[job.key] for job in jobs if job.key in done]


def _worker_error(key: int, device: str, text: str) -> str:
    which = f"run {key}" if key >= 0 else "loading the model"
    return f"the worker on {device} failed ({which}): {text}"


# A worker that fails stops the sweep: the others finish their step, keep its checkpoint and take no further run.
WORKER_DEATH = DeathPolicy(
    terminate=False,
    done_is_final=False,
    error_message=_worker_error,
    exit_message=lambda code: f"a worker process ended with exit code {code} before finishing its runs.",
)
