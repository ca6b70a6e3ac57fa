"""The training panel's server side: one `LivePanel` per run in progress.

It sends the panel's websocket events to every open page (a second tab sees the run too), at most one step event
per MIN_EVENT_INTERVAL_S (the points in between travel in the next event, so the chart misses none), holds the
flags the panel's buttons set (Stop & keep, Sample now) for the trainer to poll, measures the live clinic at every
validation and marks the sweet spot. Images never travel inside events: they are files the page fetches through
ComfyUI's /view.

Events (`data.run` = run name, `data.node` = the Train (or Sweep) node's id; a run of a sweep adds `data.sweep` =
{name, index, total, knob, value, text: "run 2 of 3: learning_rate 5e-05"} to every event and to the snapshot):
  klein_lab.train.step        {step, total, points: [[step, loss, val_loss|None], ...], rate, eta, peak_vram, phase}
  klein_lab.train.phase       {phase, step}
  klein_lab.train.checkpoint  {step, lora}
  klein_lab.train.sample      {step, images: [{prompt, text, image: {filename, subfolder, type}}]}
  klein_lab.train.clinic      {record, mark}
  klein_lab.train.done        {status: finished | stopped | sweet_spot | cancelled | already_finished, message, lora}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...trainer_core.analysis.live_clinic import (
    RULES,
    LiveClinic,
    append_clinic,
    clinic_possible,
    measure_validation,
    prompt_groups,
    read_clinic,
    truncate_clinic,
)
from .feedback import EVENT_CHECKPOINT, EVENT_DONE, EVENT_SAMPLE, EVENT_STEP, prompt_server

LOG = logging.getLogger("klein_lora_lab")
EVENT_PHASE = "klein_lab.train.phase"
EVENT_CLINIC = "klein_lab.train.clinic"
MIN_EVENT_INTERVAL_S = 0.1  # at most 10 step events per second, whatever the speed of training
PHASES = ("encoding", "compiling (one-off)", "training", "sampling", "saving")


def broadcast(event: str, data: dict[str, Any]) -> None:
    """A websocket event to every connected page (ignored when no server runs)."""
    server = prompt_server()
    if server is not None:
        server.send_sync(event, data, None)


def peak_vram_gib() -> float | None:
    """Peak memory allocated on the CUDA device so far, GiB; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


@dataclass(frozen=True)
class ClinicSetup:
    """What the live clinic needs: the validation prompts (in render order), the trigger word, the album's
    latents, and the auto-stop (None = off, N = stop N validations after the mark)."""

    prompts: tuple[str, ...]
    trigger: str
    album_latents: tuple[Tensor, ...]
    stop_after: int | None = None

    def possible(self) -> bool:
        return bool(self.album_latents) and clinic_possible(self.prompts, self.trigger)


@dataclass
class _Control:
    stop: bool = False
    sample: bool = False


_LIVE: dict[str, LivePanel] = {}
_LOCK = threading.Lock()


def live_panel(run_name: str) -> LivePanel | None:
    """The panel of run `run_name` while it trains, else None."""
    with _LOCK:
        return _LIVE.get(run_name)


def live_run_of_node(node_id: str) -> str | None:
    """The run that node `node_id` trains now (a Sweep node trains one run after another), else None."""
    with _LOCK:
        return next((name for name, panel in _LIVE.items() if str(panel.node_id) == node_id), None)


def request_stop(run_name: str) -> LivePanel | None:
    """Stop & keep: the run stops after its current step and keeps its work. None when it is not training."""
    panel = live_panel(run_name)
    if panel is not None:
        panel.control.stop = True
    return panel


def request_sample(run_name: str) -> LivePanel | None:
    """Sample now: validation previews after the current step. None when the run is not training."""
    panel = live_panel(run_name)
    if panel is not None:
        panel.control.sample = True
    return panel


@dataclass
class LivePanel:
    run_name: str
    node_id: str | None
    total: int
    first_step: int
    run_path: Path
    clinic_setup: ClinicSetup | None = None
    compiling: bool = False
    sweep: dict[str, Any] | None = None  # which run of a sweep this is (see the module doc), None for a lone run
    control: _Control = field(default_factory=_Control)
    phase: str = "training"
    step: int = 0
    last_checkpoint: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        self.step = self.first_step
        self.started = time.perf_counter()
        self._pending: list[list[Any]] = []
        self._last_sent = 0.0
        self.clinic: LiveClinic | None = None
        self.base_latents: Tensor | None = None
        self.events_sent = 0
        setup = self.clinic_setup
        if setup is not None and setup.possible():
            truncate_clinic(self.run_path, self.first_step)  # records past the resumed checkpoint are stale
            self.clinic = LiveClinic(read_clinic(self.run_path), setup.stop_after)
            self.groups = prompt_groups(setup.prompts, setup.trigger)
        if self.compiling:
            self.phase = "compiling (one-off)"

    # -- lifetime -------------------------------------------------------------------------------------------

    def __enter__(self) -> LivePanel:
        with _LOCK:
            _LIVE[self.run_name] = self
        self.send_phase(self.phase)
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        with _LOCK:
            if _LIVE.get(self.run_name) is self:
                del _LIVE[self.run_name]

    def _send(self, event: str, data: dict[str, Any]) -> None:
        self.events_sent += 1
        sweep = {"sweep": self.sweep} if self.sweep is not None else {}
        broadcast(event, {"run": self.run_name, "node": self.node_id, **sweep, **data})

    # -- the trainer's side -----------------------------------------------------------------------------------

    def rate(self) -> float:
        done = self.step - self.first_step
        elapsed = time.perf_counter() - self.started
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def on_step(self, step: int, loss: float, val_loss: float | None, checkpoint_due: bool) -> None:
        self.step = step
        self._pending.append([step, loss, val_loss])
        if self.phase != "training":
            self.phase = "training"
        if checkpoint_due:
            self.phase = "saving"
        now = time.perf_counter()
        if now - self._last_sent >= MIN_EVENT_INTERVAL_S or step >= self.total or checkpoint_due:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send the step points not sent yet (one event)."""
        if not self._pending:
            return
        rate = self.rate()
        eta = (self.total - self.step) / rate if rate > 0 else None
        points, self._pending = self._pending, []
        self._last_sent = time.perf_counter() if now is None else now
        self._send(
            EVENT_STEP,
            {
                "step": self.step,
                "total": self.total,
                "points": points,
                "rate": rate,
                "eta": eta,
                "peak_vram": peak_vram_gib(),
                "phase": self.phase,
            },
        )

    def send_phase(self, phase: str) -> None:
        self.flush()
        self.phase = phase
        self._send(EVENT_PHASE, {"phase": phase, "step": self.step})

    def on_checkpoint(self, step: int, lora: str) -> None:
        self.flush()
        self.last_checkpoint = lora
        self.phase = "training"
        self._send(EVENT_CHECKPOINT, {"step": step, "lora": lora})

    def on_samples(self, step: int, images: Sequence[dict[str, Any]]) -> None:
        """The previews of a validation are on disk: tell the pages where (labels: prompt index and text)."""
        self.flush()
        prompts = self.clinic_setup.prompts if self.clinic_setup else ()
        entries = [
            {"prompt": i, "text": prompts[i] if i < len(prompts) else f"prompt {i}", "image": ref}
            for i, ref in enumerate(images)
        ]
        self._send(EVENT_SAMPLE, {"step": step, "images": entries})

    def wants_validation(self) -> bool:
        if self.control.sample:
            self.control.sample = False
            return True
        return False

    def needs_base(self) -> bool:
        return self.clinic is not None and self.base_latents is None

    def set_base(self, latents: Tensor) -> None:
        self.base_latents = latents.detach().float().cpu()

    def on_validation_latents(self, step: int, latents: Tensor, metrics: Sequence[dict[str, Any]] = ()) -> None:
        """Measure the clinic on this validation's latents; mark the sweet spot when a stop rule is met."""
        if self.clinic is None or self.base_latents is None or self.clinic_setup is None:
            return
        record = measure_validation(
            step, latents.detach().float().cpu(), self.base_latents, self.clinic_setup.album_latents, self.groups
        )
        append_clinic(self.run_path, record)
        new_mark = self.clinic.add(record, metrics)
        if new_mark is not None:
            LOG.info("Klein LoRA Lab: sweet spot marked at step %d (%s)", new_mark.step, RULES[new_mark.rule])
        mark = self.clinic.mark.to_dict() if self.clinic.mark else None
        self._send(EVENT_CLINIC, {"record": record, "mark": mark})

    def stop_requested(self) -> bool:
        return self.control.stop or (self.clinic is not None and self.clinic.should_stop())

    def stopped_at_sweet_spot(self) -> bool:
        return not self.control.stop and self.clinic is not None and self.clinic.should_stop()

    def done(self, status: str, message: str, lora: str) -> None:
        self.flush()
        self.message = message
        self._send(EVENT_DONE, {"status": status, "message": message, "lora": lora, "step": self.step})

    def snapshot(self) -> dict[str, Any]:
        """What a page that connects mid-run needs besides the run folder: the live status."""
        rate = self.rate()
        return {
            "node": self.node_id,
            "step": self.step,
            "total": self.total,
            "phase": self.phase,
            "rate": rate,
            "eta": (self.total - self.step) / rate if rate > 0 else None,
            "peak_vram": peak_vram_gib(),
            "last_checkpoint": self.last_checkpoint,
            "stop_requested": self.control.stop,
            "sweep": self.sweep,
        }
