"""Reading a sweep: every run's loss on one chart, and what each run did in words.

Per run the reading uses what the run folder holds: its diagnostics (the clinic's measurements per checkpoint ×
scale, written by the diagnose node) when there are any, else its validation loss. The lines read like the lab's
comparisons: "learning_rate=0.0002: memorised from step 600", "learning_rate=1e-05: still timid at step 1000",
"learning_rate=5e-05: sweet spot at step 800, scale 1". The sweet-spot rule itself is sweet_spot.suggest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..runs.runfolder import RunFolder, checkpoint_step
from .charts import AXIS_TEXT, BACKGROUND, GRID, chart_font, nice_ticks, tick_label
from .diagnostics import clinic
from .loss_curve import LossHistory, ema, history_from_records
from .sweet_spot import VAL_RISE_NOTE, read_diagnostics, suggest, val_loss_series

# One colour per run, far apart in hue; more runs than colours reuse them in order.
RUN_COLOURS = (
    (110, 190, 255),
    (255, 170, 60),
    (120, 210, 120),
    (240, 110, 110),
    (200, 140, 255),
    (240, 220, 90),
    (90, 220, 220),
    (255, 140, 200),
)


@dataclass
class RunEvidence:
    """What one run of a sweep left on disk: its label (knob=value), metrics records, diagnostics records (may be
    empty) and checkpoint steps."""

    label: str
    metrics: Sequence[Mapping[str, Any]] = ()
    diagnostics: Sequence[Mapping[str, Any]] = ()
    checkpoints: Sequence[int] = ()
    history: LossHistory = field(default_factory=LossHistory)


def evidence_of(label: str, folder: Path) -> RunEvidence:
    """A run folder's evidence: metrics.jsonl, diagnostics.json (when the run was diagnosed), checkpoint steps."""
    run = RunFolder.open(folder)
    metrics = run.read_metrics()
    steps = [checkpoint_step(p) for p in run.checkpoints()]
    diagnostics = read_diagnostics(folder)
    records = diagnostics["records"] if diagnostics else []
    return RunEvidence(label, metrics, records, steps, history_from_records(metrics, steps))


def _scale_nearest_one(records: Sequence[Mapping[str, Any]]) -> float:
    scales = sorted({float(r["scale"]) for r in records if float(r["scale"]) > 0})
    return min(scales, key=lambda s: (abs(math.log(s)), s))


def _from_diagnostics(run: RunEvidence) -> str:
    spot = suggest(run.diagnostics, run.metrics, run.checkpoints)
    scale = _scale_nearest_one(run.diagnostics)
    arc = sorted((r for r in run.diagnostics if float(r["scale"]) == scale), key=lambda r: int(r["step"]))
    findings = [(int(r["step"]), clinic(r)) for r in arc]
    memorised = next((s for s, f in findings if "overfit/memorised" in f), None)
    if findings and all("underfit/timid" in f for _, f in findings):
        return f"{run.label}: still timid at step {findings[-1][0]} (scale {scale:g}): train longer or raise it"
    if spot.verdict.startswith("healthy"):
        line = f"{run.label}: sweet spot at step {spot.step}, scale {spot.scale:g}"
        if memorised is not None and memorised > spot.step:
            line += f"; memorised from step {memorised}"
        return line
    if memorised is not None:
        return f"{run.label}: memorised from step {memorised} (scale {scale:g}): the album comes back"
    return f"{run.label}: {spot.verdict} everywhere; least failing at step {spot.step}, scale {spot.scale:g}"


def _from_validation(run: RunEvidence) -> str:
    vsteps, vloss = val_loss_series(run.metrics)
    if len(vloss) < 2:
        if not run.history.losses:
            return f"{run.label}: no loss recorded yet"
        smooth = ema(run.history.losses)[-1]
        return f"{run.label}: smoothed loss {tick_label(smooth)} at step {run.history.steps[-1]} (no validation loss)"
    i = min(range(len(vloss)), key=lambda k: vloss[k])
    if i == len(vloss) - 1:
        return (
            f"{run.label}: validation loss still falling at step {vsteps[i]} ({vloss[i]:.4g}): timid or short, "
            "train longer"
        )
    rise = (vloss[-1] - vloss[i]) / max(abs(vloss[i]), 1e-12)
    if rise > VAL_RISE_NOTE:
        return (
            f"{run.label}: validation loss lowest at step {vsteps[i]} ({vloss[i]:.4g}), {rise:.0%} higher by step "
            f"{vsteps[-1]}: fitting the album more than it generalises from there"
        )
    return f"{run.label}: validation loss flat from step {vsteps[i]} ({vloss[i]:.4g})"


def read_run(run: RunEvidence) -> str:
    """One line on one run: from its diagnostics when there are any at a scale above 0, else its loss."""
    if any(float(r.get("scale", 0)) > 0 for r in run.diagnostics):
        return _from_diagnostics(run)
    return _from_validation(run)


def read_sweep(knob: str, runs: Sequence[RunEvidence]) -> list[str]:
    """A line per run (in the sweep's order), then the comparison: the lowest validation loss, and which runs
    still need the prompt tests (the loss alone cannot see memorisation)."""
    lines = [read_run(r) for r in runs]
    best = []
    for r in runs:
        vsteps, vloss = val_loss_series(r.metrics)
        if vloss:
            i = min(range(len(vloss)), key=lambda k: vloss[k])
            best.append((vloss[i], vsteps[i], r.label))
    if len(best) > 1:
        v, step, label = min(best)
        lines.append(f"lowest validation loss of the sweep over {knob}: {label} ({v:.4g} at step {step})")
    blind = [r.label for r in runs if not r.diagnostics]
    if blind:
        lines.append(
            f"no diagnostics yet for {', '.join(blind)}: run 'Klein Diagnose Run' on those runs for the bicycle "
            "test (memorisation, caricature, timid)."
        )
    return lines


def render_sweep_curves(
    runs: Sequence[RunEvidence], width: int = 960, height: int = 480, smoothing: float = 0.9, title: str = ""
) -> Image.Image:
    """Every run's smoothed training loss (solid) and validation loss (dots joined thinly) on one chart, one
    colour per run, with a legend of the run labels. The y range is the 2nd–98th percentile of the smoothed and
    validation losses, so one spike never flattens the rest."""
    if width < 300 or height < 160:
        raise ValueError(f"sweep chart size {width}×{height}: use at least 300×160.")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    size = max(10, height // 32)
    font = chart_font(size)
    row_h = size + 6
    legend_h = (len(runs) + 1) // 2 * row_h  # two legend entries per row, under the title
    left, right, top, bottom = 64, width - 16, 28 + legend_h, height - 28
    if title:
        draw.text((left, 6), title, fill=AXIS_TEXT, font=font)
    curves = []
    for r in runs:
        smooth = ema(r.history.losses, smoothing) if r.history.losses else []
        curves.append((r.history.steps, smooth, r.history.val_steps, r.history.val_losses))
    values = [v for _, s, _, vl in curves for v in (*s, *vl) if math.isfinite(v)]
    steps = [x for st, _, vs, _ in curves for x in (*st, *vs)]
    if not values or not steps:
        draw.text((left, height // 2), "no loss recorded yet", fill=AXIS_TEXT, font=font)
        return img
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    arr = np.asarray(values, dtype=np.float64)
    y_lo, y_hi = float(np.percentile(arr, 2)), float(np.percentile(arr, 98))
    pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.1, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def py(loss: float) -> float:
        return bottom - (min(max(loss, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (bottom - top)

    for tick in nice_ticks(y_lo, y_hi):
        draw.line([(left, py(tick)), (right, py(tick))], fill=GRID)
        draw.text((4, py(tick) - 6), tick_label(tick), fill=AXIS_TEXT, font=font)
    for tick in nice_ticks(x_lo, x_hi, 6):
        draw.line([(px(tick), top), (px(tick), bottom)], fill=GRID)
        draw.text((px(tick) - 8, bottom + 6), f"{int(tick)}", fill=AXIS_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_TEXT)
    for i, (r, (st, smooth, vs, vl)) in enumerate(zip(runs, curves, strict=True)):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        if len(st) > 1:
            draw.line([(px(s), py(v)) for s, v in zip(st, smooth, strict=True)], fill=colour, width=2)
        if vl:
            points = [(px(s), py(v)) for s, v in zip(vs, vl, strict=True)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=1)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour)
        lx = left + (i % 2) * (right - left) // 2
        ly = 26 + (i // 2) * row_h
        draw.rectangle([lx, ly + 3, lx + 12, ly + 11], fill=colour)
        draw.text((lx + 16, ly), r.label, fill=AXIS_TEXT, font=font)
    return img
