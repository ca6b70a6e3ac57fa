"""A loss-curve picture drawn with PIL: raw training loss, its EMA, validation loss and checkpoint marks.

The raw per-step loss of a diffusion run is noisy (each step draws another σ), so the smoothed curve is the
one to read; validation loss (fixed σ, fixed noise) is the curve that shows over-fitting. The y range is taken
from the 2nd–98th percentile of the raw loss so one spike never flattens the rest of the curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ..runs.runfolder import RunFolder, checkpoint_step
from .charts import AXIS_TEXT, BACKGROUND, GRID, chart_font, nice_ticks, tick_label, to_image_tensor

RAW = (90, 120, 170)
SMOOTH = (110, 190, 255)
VALIDATION = (255, 170, 60)
CHECKPOINT = (120, 200, 120)


@dataclass
class LossHistory:
    """The series a loss curve shows, in step order."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)


def ema(values: Sequence[float], decay: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards zero)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay}: must be in [0, 1).")
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = decay * acc + (1.0 - decay) * v
        out.append(acc / (1.0 - decay**i))
    return out


def history_from_records(records: Iterable[Mapping], checkpoints: Iterable[int] = ()) -> LossHistory:
    """Collect a LossHistory from metrics records (dicts with 'step' and 'loss' and/or a validation loss).

    A record may carry the training loss as 'loss', the validation loss as 'val_loss' or 'validation_loss',
    and a checkpoint as 'checkpoint' (a path) — the keys the run folder's metrics.jsonl uses. Later records for
    a step replace earlier ones (a resumed run repeats no step, but a re-run of the same step must not plot
    twice).
    """
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    marks = set(int(s) for s in checkpoints)
    for rec in records:
        if "step" not in rec:
            continue
        step = int(rec["step"])
        loss = rec.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            train[step] = float(loss)
        for key in ("val_loss", "validation_loss"):
            value = rec.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                val[step] = float(value)
        if rec.get("checkpoint"):
            marks.add(step)
    ts, vs = sorted(train), sorted(val)
    return LossHistory(ts, [train[s] for s in ts], vs, [val[s] for s in vs], sorted(marks))


def render_loss_curve(
    history: LossHistory, width: int = 768, height: int = 384, smoothing: float = 0.9, title: str = ""
) -> Image.Image:
    """Draw the loss curve as a PIL RGB image of exactly width × height."""
    if width < 200 or height < 120:
        raise ValueError(f"loss curve size {width}×{height}: use at least 200×120.")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = chart_font(max(10, height // 32))
    left, right, top, bottom = 64, width - 16, 28, height - 28
    if title:
        draw.text((left, 6), title, fill=AXIS_TEXT, font=font)

    all_steps = history.steps + history.val_steps + history.checkpoints
    all_losses = history.losses + history.val_losses
    if not all_losses:
        draw.text((left, height // 2), "no loss recorded yet", fill=AXIS_TEXT, font=font)
        return img

    x_lo, x_hi = min(all_steps), max(all_steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    values = np.asarray(all_losses, dtype=np.float64)
    y_lo, y_hi = float(np.percentile(values, 2)), float(np.percentile(values, 98))
    if history.val_losses:
        y_lo, y_hi = min(y_lo, min(history.val_losses)), max(y_hi, max(history.val_losses))
    pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.1, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def py(loss: float) -> float:
        clamped = min(max(loss, y_lo), y_hi)
        return bottom - (clamped - y_lo) / (y_hi - y_lo) * (bottom - top)

    for tick in nice_ticks(y_lo, y_hi):
        y = py(tick)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 6), tick_label(tick), fill=AXIS_TEXT, font=font)
    for tick in nice_ticks(x_lo, x_hi, 6):
        x = px(tick)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x - 8, bottom + 6), f"{int(tick)}", fill=AXIS_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_TEXT)

    for step in history.checkpoints:
        x = px(step)
        for y0 in range(top, bottom, 8):  # dashed vertical line
            draw.line([(x, y0), (x, min(y0 + 4, bottom))], fill=CHECKPOINT)
        draw.polygon([(x - 4, top), (x + 4, top), (x, top + 7)], fill=CHECKPOINT)

    def polyline(steps: Sequence[int], losses: Sequence[float], colour: tuple[int, int, int], w: int) -> None:
        points = [(px(s), py(v)) for s, v in zip(steps, losses, strict=True)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=w, joint="curve")

    polyline(history.steps, history.losses, RAW, 1)
    if len(history.losses) > 1:
        polyline(history.steps, ema(history.losses, smoothing), SMOOTH, 2)
    if history.val_losses:
        polyline(history.val_steps, history.val_losses, VALIDATION, 2)
        for s, v in zip(history.val_steps, history.val_losses, strict=True):
            x, y = px(s), py(v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VALIDATION)

    legend = [("loss", RAW), (f"smoothed (EMA {smoothing})", SMOOTH)]
    if history.val_losses:
        legend.append(("validation", VALIDATION))
    if history.checkpoints:
        legend.append(("checkpoint", CHECKPOINT))
    x = right - 8
    for label, colour in reversed(legend):
        text_w = draw.textlength(label, font=font)
        x -= text_w + 22
        draw.rectangle([x, 10, x + 12, 18], fill=colour)
        draw.text((x + 16, 6), label, fill=AXIS_TEXT, font=font)
    if history.losses:
        last = f"step {history.steps[-1]}  loss {tick_label(history.losses[-1])}"
        draw.text((right - draw.textlength(last, font=font), top + 4), last, fill=AXIS_TEXT, font=font)
    return img


def loss_curve_image(
    history: LossHistory, width: int = 768, height: int = 384, smoothing: float = 0.9, title: str = ""
) -> Tensor:
    """The loss curve as a ComfyUI IMAGE tensor [1, height, width, 3]."""
    return to_image_tensor(render_loss_curve(history, width, height, smoothing, title))


def run_loss_curve(run: RunFolder, width: int, height: int, smoothing: float) -> Tensor:
    """[1, height, width, 3] IMAGE of a run's metrics, with its checkpoints marked (the Train and Loss Curve
    nodes, the demo)."""
    history = history_from_records(run.read_metrics(), [checkpoint_step(p) for p in run.checkpoints()])
    return loss_curve_image(history, width, height, smoothing, title=run.path.name)
