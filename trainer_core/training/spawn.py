"""Worker processes that train: started with `torch.multiprocessing`'s spawn, given this pack and a payload, and
ended for sure (joined, then terminated) whatever happens in the parent.

A spawned child starts a fresh interpreter. It cannot import this pack by name on its own: ComfyUI (and the test
harness) import the pack from a file path under a module name of their choice, with no sys.path entry that finds
it. So the child runs `spawn_entry.py` by path (`runpy.run_path` is importable everywhere), which registers the
pack under the parent's module name and only then takes the payload (settings, items, the model source) from its
setup queue and calls the target. Parent and child therefore share one module name and every class resolves.

ComfyUI's `main.py` is a script with start-up work at module level; spawn would re-run it in every child as
`__mp_main__` (argument parsing, prestartup scripts, the asset seeder). `_main_not_rerun` marks the main module
as one the child must not import again (multiprocessing skips a main module named `__main__`).

Progress comes back over a queue as plain tuples (`QueueCallbacks`); Cancel goes out through a shared event.
The parent relays those events until every process has ended (`follow_processes`); what the death of one process
means for the others is the caller's `DeathPolicy` (data-parallel ranks end together, sweep workers do not).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import queue
import runpy
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.multiprocessing as mp
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from .data import TrainItem
from .trainer import TrainCallbacks

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = __name__.rsplit(".trainer_core.", 1)[0]  # the name the parent imported the pack under
ENTRY = Path(__file__).with_name("spawn_entry.py")
JOIN_TIMEOUT_S = 30.0  # a worker asked to stop finishes its step and its checkpoint within this time
POLL_S = 0.05  # how often the parent looks at Cancel while no event arrives
GRACE_POLLS = 20  # a process that ended with an error gets 1 s for its report to arrive before its exit code is all

Event = tuple  # ('started', key, device) | ('step', key, step, total, loss, lr, s) | ('checkpoint', key, step, path)
# | ('done', key, device, steps, stopped, last path or None, loss, notes) | ('error', key, device, text)


class ModelSource(Protocol):
    """How a worker gets its own copy of the diffusion model: a picklable description (a file path, a tiny
    model's seed), never the module itself. `load` runs in the worker."""

    def load(self, device: torch.device) -> nn.Module: ...


@dataclass(frozen=True)
class ItemsBlob:
    """Training items as one safetensors buffer. Tensors put on a queue as they are would be moved to shared memory
    with one file descriptor each, and an album of a few hundred items with references runs past the usual limit
    of open files; one buffer is one copy per worker, whatever the album's size."""

    data: bytes
    names: tuple[str, ...]
    refs: tuple[int, ...]

    @classmethod
    def of(cls, items: Sequence[TrainItem]) -> ItemsBlob:
        def own(t: Tensor) -> Tensor:  # a copy: items may be views of one encoded batch, which safetensors refuses
            return t.detach().to("cpu", copy=True).contiguous()

        tensors = {}
        for i, item in enumerate(items):
            tensors[f"{i}.latent"], tensors[f"{i}.context"] = own(item.latent), own(item.context)
            for k, ref in enumerate(item.refs):
                tensors[f"{i}.ref.{k}"] = own(ref)
        return cls(save_tensors(tensors), tuple(it.name for it in items), tuple(len(it.refs) for it in items))

    def items(self) -> tuple[TrainItem, ...]:
        t = load_tensors(self.data)
        return tuple(
            TrainItem(t[f"{i}.latent"], t[f"{i}.context"], tuple(t[f"{i}.ref.{k}"] for k in range(n)), name)
            for i, (name, n) in enumerate(zip(self.names, self.refs, strict=True))
        )


@dataclass(frozen=True)
class RunDone:
    """What a process reports for a finished (or stopped) run."""

    key: int
    device: str
    steps_done: int
    stopped_early: bool
    last_checkpoint: Path | None
    final_loss: float
    notes: tuple[str, ...]


@dataclass(frozen=True)
class DeathPolicy:
    """What a failed process means for the others, and how the failure reads.

    terminate: end the others at once (data-parallel ranks wait in a collective that never completes); otherwise
        set `stop` and let each finish its step with its checkpoint (the workers of a sweep).
    done_is_final: the first 'done' reports the whole job, sent after the process group is torn down: a process
        that dies after it died in its own teardown, and the job (checkpoints, metrics, run.json) is complete.
    error_message(key, device, text): the failure for an ('error', ...) event.
    exit_message(exit code): the failure for a process that ended without a report (a signal, a failed start)."""

    terminate: bool
    done_is_final: bool
    error_message: Callable[[int, str, str], str]
    exit_message: Callable[[int], str]


class WorkerFailed(RuntimeError):
    """A worker process raised or died; the message names the worker, its device and the error."""


def parse_devices(text: str) -> list[str]:
    """ "cuda:0, cuda:1" -> ['cuda:0', 'cuda:1']; "" -> [] (train in this process); "auto" -> every visible
    CUDA device when there are two or more, else []. Each entry must name a torch device ('cpu', 'cuda:1')."""
    text = text.strip()
    if text.lower() == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count > 1 else []
    names = [t.strip() for t in text.replace(";", ",").replace("\n", ",").split(",") if t.strip()]
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(
                f"devices: {name!r} is not a device; list devices like 'cuda:0, cuda:1' (or 'cpu, cpu'), "
                "'auto' for every GPU, or leave it empty to train in this process."
            ) from None
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"devices: {name!r} is not visible here ({torch.cuda.device_count()} CUDA device(s)); "
                "list only the GPUs this machine has."
            )
    return names


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While processes start: a main module run as a script (ComfyUI's main.py) is not run again in them."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not hasattr(main, "__file__"):
        yield
        return
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None


def start(target: str, payload: Any, channels: dict[str, Any]) -> mp.Process:
    """Start one spawned process running `target` ('trainer_core.training.workers:worker_main', relative to the
    pack) as target(payload, **channels). `channels` are multiprocessing queues/events (passed by the spawn
    machinery); `payload` goes through a queue the child reads once the pack is registered there."""
    context = mp.get_context("spawn")
    setup = context.Queue()
    setup.put(payload)
    setup.cancel_join_thread()  # a child that dies before reading it must not hold this process at exit
    init = {
        "PACK_NAME": PACK_NAME,
        "PACK_DIR": str(PACK_DIR),
        "TARGET": target,
        "SETUP": setup,
        "CHANNELS": channels,
        "THREADS": torch.get_num_threads(),  # CPU results depend on the intra-op split: match the parent's
    }
    process = context.Process(
        target=runpy.run_path, args=(str(ENTRY),), kwargs={"init_globals": init, "run_name": "__klein_lab_worker__"}
    )
    with _main_not_rerun():
        process.start()
    # start() drops its reference to the arguments; the queue must live until the child has opened it.
    process.setup_queue = setup
    return process


def stop_all(processes: Sequence[mp.Process], timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Join every process within `timeout_s` in all; the ones still alive are terminated, then killed."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


def follow_processes(
    processes: Sequence[mp.Process],
    events,
    stop,
    policy: DeathPolicy,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[int, RunDone], str]:
    """Relay `events` to `on_event` until every process has ended; `should_stop` (Cancel) is polled meanwhile and
    sets `stop`. Returns the 'done' reports by key and the first failure ('' when none); on a failure `stop` is
    set and, with `policy.terminate`, every process still alive is terminated."""
    done: dict[int, RunDone] = {}
    failure = ""
    quiet = 0  # polls in a row without an event
    while True:
        if should_stop is not None and not stop.is_set() and should_stop():
            stop.set()
        try:
            event = events.get(timeout=POLL_S)
        except queue.Empty:
            quiet += 1
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            finished = policy.done_is_final and bool(done)
            # A process's own error report may still be in the pipe when it has ended: give it GRACE_POLLS to come.
            if dead and not failure and not finished and quiet > GRACE_POLLS:
                failure = policy.exit_message(dead[0].exitcode)
                _after_failure(processes, stop, policy)
            if all(not p.is_alive() for p in processes) and (failure or not dead or finished):
                return done, failure
            continue
        quiet = 0
        if event[0] == "done":
            key, device, steps, stopped, last, loss, notes = event[1:]
            done[key] = RunDone(key, device, steps, stopped, Path(last) if last else None, loss, tuple(notes))
        elif event[0] == "error" and not failure:
            failure = policy.error_message(*event[1:4])
            _after_failure(processes, stop, policy)
        if on_event is not None:
            on_event(event)


def _after_failure(processes: Sequence[mp.Process], stop, policy: DeathPolicy) -> None:
    stop.set()
    if policy.terminate:
        for p in processes:
            if p.is_alive():
                p.terminate()


def error_text(err: BaseException) -> str:
    """An error of a worker as text for the parent (the pack's error types are not picklable)."""
    last = traceback.extract_tb(err.__traceback__)[-1:] or []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"


class QueueCallbacks(TrainCallbacks):
    """A worker's training callbacks: every step and checkpoint as a tuple on `events`, Cancel from `stop`.

    Events: ('step', key, step, total, loss, lr, seconds), ('checkpoint', key, step, path as str)."""

    def __init__(self, key: int, events, stop) -> None:
        self.key, self.events, self.stop = key, events, stop

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        self.events.put(("step", self.key, step, total, loss, lr, seconds))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.events.put(("checkpoint", self.key, step, str(path)))

    def should_stop(self) -> bool:
        return self.stop.is_set()
