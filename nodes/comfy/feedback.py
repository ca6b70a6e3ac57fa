"""Live feedback on the node: the progress bar with previews, a text line (loss, speed, ETA) and
`PromptServer.send_sync` events for the page."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import comfy.latent_formats
import comfy.utils
from PIL import Image

LOG = logging.getLogger("klein_lora_lab")
EVENT_STEP = "klein_lab.train.step"
EVENT_CHECKPOINT = "klein_lab.train.checkpoint"
EVENT_SAMPLE = "klein_lab.train.sample"
EVENT_DONE = "klein_lab.train.done"
TEXT_INTERVAL_S = 0.1  # the node's text line is refreshed at most 10 times a second (the last step always)


def prompt_server():
    """ComfyUI's PromptServer instance, or None when no server runs (in-process use, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket event for the frontend (ignored when no server runs)."""
    server = prompt_server()
    if server is not None:
        server.send_sync(event, data, server.client_id)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LiveProgress:
    """Progress bar, on-node text (loss, it/s, ETA) and websocket events for one training run."""

    def __init__(self, total: int, node_id: str | None, run_name: str, first_step: int = 0) -> None:
        self.total = total
        self.node_id = node_id
        self.run_name = run_name
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.first_step = first_step
        self.started = time.perf_counter()
        self.last_loss: float | None = None
        self.last_text = 0.0
        self.bar.update_absolute(first_step, total)

    def rate(self, step: int) -> float:
        """Steps per second over this session's steps (a resumed run does not count the earlier ones)."""
        done = step - self.first_step
        elapsed = time.perf_counter() - self.started
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def line(self, step: int, loss: float, lr: float) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        return f"step {step}/{self.total} · loss {loss:.4f} · lr {lr:.2e} · {rate:.2f} it/s · ETA {format_eta(eta)}"

    def step(self, step: int, loss: float, lr: float) -> None:
        self.last_loss = loss
        self.bar.update_absolute(step, self.total)
        now = time.perf_counter()
        if now - self.last_text < TEXT_INTERVAL_S and step < self.total:
            return  # the panel's step events (live_panel) carry every point; the text only needs a fresh line
        self.last_text = now
        server = prompt_server()
        if server is not None and self.node_id is not None:
            server.send_progress_text(self.line(step, loss, lr), self.node_id, server.client_id)

    def preview(self, step: int, image: Image.Image) -> None:
        self.bar.update_absolute(step, self.total, preview=("JPEG", image, 512))


class WorkersProgress:
    """The runs of a sweep trained by worker processes: one bar over every run's steps, one text line per run
    (device, label, step, loss), refreshed at most 10 times a second."""

    def __init__(self, node_id: str | None, runs: dict[int, tuple[str, int]]) -> None:
        self.node_id = node_id
        self.runs = runs  # key -> (label, steps)
        self.steps = dict.fromkeys(runs, 0)
        self.lines: dict[int, str] = {}
        self.devices: dict[int, str] = {}
        self.total = max(1, sum(steps for _, steps in runs.values()))
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.last_text = 0.0

    def line(self, key: int) -> str:
        return self.lines.get(key, "")

    def event(self, event: tuple) -> None:
        """One event of train_runs_on_devices: ('started', key, device), ('step', key, step, total, loss, ...),
        ('done', key, device, ...)."""
        kind, key = event[0], event[1]
        label, steps = self.runs.get(key, ("", 0))
        if kind == "started":
            self.devices[key] = event[2]
            self.lines[key] = f"{event[2]} · {label} · starting"
        elif kind == "step":
            self.steps[key] = event[2]
            self.lines[key] = f"{self.devices.get(key, '?')} · {label} · step {event[2]}/{steps} · loss {event[4]:.4f}"
            self.bar.update_absolute(sum(self.steps.values()), self.total)
        elif kind == "done":
            self.lines[key] = f"{event[2]} · {label} · {'stopped' if event[4] else 'finished'} at step {event[3]}"
        else:
            return
        now = time.perf_counter()
        if kind == "step" and now - self.last_text < TEXT_INTERVAL_S:
            return
        self.last_text = now
        server = prompt_server()
        if server is not None and self.node_id is not None:
            server.send_progress_text(
                "\n".join(self.lines[k] for k in sorted(self.lines)), self.node_id, server.client_id
            )
