"""The sweet spot of a run: which checkpoint at which scale, why, and the curves that say so.

Reads `<run>/diagnostics.json` (written by the diagnose node: one record of measures per checkpoint × scale,
see diagnostics.py) and the validation loss of `<run>/metrics.jsonl`. The rule (docs/diagnostics.md):

1. every record gets the clinic's findings (diagnostics.clinic): underfit/timid, overfit/memorised,
   too strong/caricature, leaks without trigger;
2. healthy records are those without the first three; among them the concept strength peaks at P. Among the
   records reaching NEAR_PEAK·P the pick takes the scale closest to 1 (what the LoRA was trained for), then
   the earliest checkpoint (less time to memorise). A record that leaks without trigger is only taken when
   every near-peak record leaks;
3. no healthy record: all timid -> the strongest one, with "train longer"; otherwise the least failing one
   (highest of memorisation ratio and flexibility relative to their thresholds), with what to change;
4. no diagnostics at all: the checkpoint nearest the validation-loss minimum at scale 1.

The result keeps every curve it used (by step at the chosen scale, by scale at the chosen checkpoint, the
validation loss), and `render_sweet_spot` draws them with the pick marked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..errors import shown
from ..files.atomic import atomic_write_bytes
from ..files.safe_paths import confined_file
from .charts import AXIS_TEXT, BACKGROUND, GRID, chart_font, nice_ticks, tick_label
from .diagnostics import COLLAPSED_BELOW, LEAK_ABOVE, MEMORISED_BELOW, TIMID_BELOW, clinic, crossing

DIAGNOSTICS_FILE = "diagnostics.json"
DIAGNOSTICS_FORMAT = "klein_lab.diagnostics.v1"
NEAR_PEAK = 0.9
VAL_RISE_NOTE = 0.05  # a validation loss that ends 5 % above its minimum is worth a line
BLOCKING = ("underfit/timid", "overfit/memorised", "too strong/caricature")
CURVE_KEYS = ("concept", "flexibility", "memorisation", "trigger_free_drift")
COLOURS = {
    "concept": (110, 190, 255),
    "flexibility": (120, 200, 120),
    "memorisation": (240, 110, 110),
    "trigger_free_drift": (200, 140, 255),
    "val_loss": (255, 170, 60),
    "pick": (255, 255, 255),
}
LABELS = {
    "concept": "concept strength",
    "flexibility": "flexibility (vs base)",
    "memorisation": "bicycle distance (vs base)",
    "trigger_free_drift": "trigger-free drift",
    "val_loss": "validation loss (scaled)",
}


# ---------------------------------------------------------------------------------------------- the file


def write_diagnostics(run_path: Path, config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write `<run>/diagnostics.json` atomically. Records of an earlier pass with the same config (prompts,
    seed, sampler, size) are kept unless this pass measured the same (step, scale) again; a pass with another
    config replaces the file (its numbers would not be comparable)."""
    path = Path(run_path) / DIAGNOSTICS_FILE
    merged: dict[tuple[int, float], dict] = {}
    old = read_diagnostics(run_path)
    if old is not None and old.get("config") == dict(config):
        merged = {(int(r["step"]), float(r["scale"])): r for r in old["records"]}
    for r in records:
        merged[(int(r["step"]), float(r["scale"]))] = dict(r)
    data = {"format": DIAGNOSTICS_FORMAT, "config": dict(config), "records": [merged[k] for k in sorted(merged)]}
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())
    return path


def read_diagnostics(run_path: Path) -> dict[str, Any] | None:
    """The parsed diagnostics file of a run, or None when the run has none yet."""
    path = Path(run_path) / DIAGNOSTICS_FILE
    if not path.is_file():
        return None
    confined_file(path, [run_path], f"diagnostics of run {Path(run_path).name}")  # a link out is never read
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is damaged (not JSON: {shown(str(err))}). Fix: delete it and run the diagnosis again."
        ) from err
    if not isinstance(data, dict) or data.get("format") != DIAGNOSTICS_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {shown(found)} is not {DIAGNOSTICS_FORMAT!r}; re-run the diagnosis.")
    return data


def val_loss_series(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, val_loss) from metrics.jsonl records, later records of a step replacing earlier ones."""
    val: dict[int, float] = {}
    for rec in records:
        value = rec.get("val_loss")
        if "step" in rec and isinstance(value, (int, float)) and math.isfinite(value):
            val[int(rec["step"])] = float(value)
    steps = sorted(val)
    return steps, [val[s] for s in steps]


# ---------------------------------------------------------------------------------------------- the choice


@dataclass
class SweetSpot:
    """The suggestion: checkpoint step, scale, the clinic's verdict for it, reasons in plain words, and the
    curves used (by_step at the chosen scale, by_scale at the chosen step, val_loss)."""

    step: int
    scale: float
    verdict: str
    reasons: list[str]
    curves: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        head = f"sweet spot: checkpoint step {self.step} at scale {self.scale:g} — {self.verdict}"
        return "\n".join([head, *(f"- {r}" for r in self.reasons)])


def _f(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _scale_key(scale: float) -> float:
    return abs(math.log(scale)) if scale > 0 else math.inf


def _describe(r: Mapping[str, Any]) -> str:
    parts = []
    if _f(r.get("concept")) is not None:
        parts.append(f"concept strength {r['concept']:.2f}")
    if _f(r.get("flexibility")) is not None:
        parts.append(f"flexibility {r['flexibility']:.2f} of the base")
    if _f(r.get("memorisation")) is not None:
        parts.append(f"bicycle prompts at {r['memorisation']:.2f} of the base's distance to the album")
    if _f(r.get("trigger_free_drift")) is not None:
        parts.append(f"trigger-free drift {r['trigger_free_drift']:.2f}")
    return ", ".join(parts)


def _curve(records: Sequence[Mapping[str, Any]], axis: str) -> dict[str, list]:
    ordered = sorted(records, key=lambda r: r[axis])
    out: dict[str, list] = {axis + "s": [r[axis] for r in ordered]}
    for key in CURVE_KEYS:
        out[key] = [_f(r.get(key)) for r in ordered]
    return out


def _pick_without_diagnostics(steps: Sequence[int], vsteps: list[int], vloss: list[float]) -> SweetSpot:
    if not steps:
        raise ValueError(
            "the run has no checkpoints yet: train it (checkpoint_every > 0) before asking for a sweet spot."
        )
    if not vloss:
        return SweetSpot(
            max(steps),
            1.0,
            "unknown",
            [
                "no diagnostics and no validation loss in this run: run 'Klein Diagnose Run' on it (the bicycle test "
                "per checkpoint), or train with validation_every > 0. Suggesting the last checkpoint at scale 1."
            ],
            {"val_loss": {"steps": vsteps, "values": vloss}},
        )
    best = vsteps[min(range(len(vloss)), key=lambda i: vloss[i])]
    step = min(steps, key=lambda s: (abs(s - best), s))
    return SweetSpot(
        step,
        1.0,
        "by validation loss only",
        [
            f"no diagnostics for this run: the validation loss is lowest at step {best} "
            f"({vloss[vsteps.index(best)]:.4g}); checkpoint {step} is the nearest. Loss alone cannot see "
            "memorisation: run 'Klein Diagnose Run' for the prompt tests."
        ],
        {"val_loss": {"steps": vsteps, "values": vloss}},
    )


def suggest(
    diag_records: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]] = (),
    checkpoint_steps: Sequence[int] = (),
) -> SweetSpot:
    """The sweet spot from diagnostics records (dicts with step, scale and the measures), the run's metrics
    records (for val_loss) and its checkpoint steps (used when there are no diagnostics)."""
    vsteps, vloss = val_loss_series(metrics)
    records = [dict(r, findings=clinic(r)) for r in diag_records if float(r.get("scale", 0)) > 0]
    if not records:
        return _pick_without_diagnostics(checkpoint_steps, vsteps, vloss)

    healthy = [r for r in records if not set(r["findings"]) & set(BLOCKING)]
    reasons: list[str] = []
    if healthy:
        peak = max(_f(r.get("concept")) or 0.0 for r in healthy)
        near = [r for r in healthy if (_f(r.get("concept")) or 0.0) >= NEAR_PEAK * peak]
        clean = [r for r in near if "leaks without trigger" not in r["findings"]] or near
        pick = min(clean, key=lambda r: (_scale_key(float(r["scale"])), int(r["step"])))
        verdict = "healthy" + (" (leaks without trigger)" if "leaks without trigger" in pick["findings"] else "")
        reasons.append(
            f"healthy: {_describe(pick)}. Within {NEAR_PEAK:.0%} of the peak concept strength of the healthy records "
            f"({peak:.2f}) at the scale nearest 1, the earliest checkpoint: identity and freedom at the same time."
        )
    elif all(r["findings"][:1] == ["underfit/timid"] for r in records):
        pick = max(records, key=lambda r: (_f(r.get("concept")) or -math.inf, -int(r["step"])))
        verdict = "underfit/timid"
        reasons.append(
            f"every checkpoint is timid (concept strength below {TIMID_BELOW}): {_describe(pick)}. Train longer "
            "or raise the learning rate (the lab: 1e-5 timid, 5e-5 default, 2e-4 frantic)."
        )
    else:

        def margin(r: Mapping[str, Any]) -> float:
            memo = _f(r.get("memorisation"))
            flex = _f(r.get("flexibility"))
            return min(
                memo / MEMORISED_BELOW if memo is not None else 9.0, flex / COLLAPSED_BELOW if flex is not None else 9.0
            )

        pick = max(records, key=lambda r: (margin(r), -int(r["step"]), -_scale_key(float(r["scale"]))))
        verdict = pick["findings"][0] if pick["findings"] else "healthy"
        reasons.append(
            f"no checkpoint and scale passes every test; the least failing one is shown: {_describe(pick)}. "
            + (
                "The album comes back whatever the prompt: use fewer steps, a lower learning rate or a more varied "
                "album (and more checkpoints early in the run)."
                if "memorised" in verdict
                else "Prompts stopped mattering: lower the scale, or train fewer steps."
            )
        )
    step, scale = int(pick["step"]), float(pick["scale"])
    at_scale = [r for r in records if float(r["scale"]) == scale]
    at_step = [r for r in records if int(r["step"]) == step]
    reasons.extend(_arc_reasons(at_scale, at_step, step, scale))
    reasons.extend(_val_reasons(vsteps, vloss, step))
    curves = {
        "by_step": dict(_curve(at_scale, "step"), scale=scale),
        "by_scale": dict(_curve(at_step, "scale"), step=step),
        "val_loss": {"steps": vsteps, "values": vloss},
    }
    return SweetSpot(step, scale, verdict, reasons, curves)


def _arc_reasons(at_scale: list[dict], at_step: list[dict], step: int, scale: float) -> list[str]:
    """Plain-word lines about the learning arc (by step) and the scale slider (at the chosen step)."""
    lines = []
    by_step = sorted(at_scale, key=lambda r: int(r["step"]))
    timid = [int(r["step"]) for r in by_step if "underfit/timid" in r["findings"]]
    if timid and min(timid) < step:
        lines.append(f"underfit/timid at scale {scale:g} up to step {max(s for s in timid if s < step)}.")
    late = [r for r in by_step if int(r["step"]) > step]
    memorised = next((int(r["step"]) for r in late if "overfit/memorised" in r["findings"]), None)
    if memorised is not None:
        lines.append(
            f"overfit/memorised from step {memorised} on at scale {scale:g}: the bicycle prompts come back as "
            "album images."
        )
    collapsed = next((int(r["step"]) for r in late if "too strong/caricature" in r["findings"]), None)
    if collapsed is not None:
        lines.append(
            f"too strong/caricature from step {collapsed} on at scale {scale:g}: prompt changes stop mattering."
        )
    scales = sorted(at_step, key=lambda r: float(r["scale"]))
    xs = [float(r["scale"]) for r in scales]
    flex_at = crossing(xs, [_f(r.get("flexibility")) for r in scales], COLLAPSED_BELOW)
    if flex_at is not None:
        lines.append(
            f"too strong/caricature above scale {flex_at:.2g} at step {step}: flexibility drops below "
            f"{COLLAPSED_BELOW}."
        )
    memo_at = crossing(xs, [_f(r.get("memorisation")) for r in scales], MEMORISED_BELOW)
    if memo_at is not None:
        lines.append(f"overfit/memorised above scale {memo_at:.2g} at step {step}.")
    leak_at = crossing(xs, [_f(r.get("trigger_free_drift")) for r in scales], LEAK_ABOVE, below=False)
    if leak_at is not None:
        lines.append(f"the concept leaks into prompts without the trigger above scale {leak_at:.2g} at step {step}.")
    return lines


def _val_reasons(vsteps: list[int], vloss: list[float], step: int) -> list[str]:
    if len(vloss) < 2:
        return []
    i = min(range(len(vloss)), key=lambda k: vloss[k])
    rise = (vloss[-1] - vloss[i]) / max(abs(vloss[i]), 1e-12)
    line = f"validation loss is lowest at step {vsteps[i]} ({vloss[i]:.4g})"
    if rise > VAL_RISE_NOTE:
        line += f" and ends {rise:.0%} higher: the later steps fit the album more than they generalise"
    return [line + "."]


# ---------------------------------------------------------------------------------------------- the chart


def render_sweet_spot(spot: SweetSpot, width: int = 960, height: int = 400, title: str = "") -> Image.Image:
    """Two panels: the measures by step at the chosen scale (with the validation loss, scaled to the panel)
    and by scale at the chosen step; threshold lines dashed, the pick marked white. PIL RGB width × height."""
    if width < 400 or height < 160:
        raise ValueError(f"sweet-spot chart size {width}×{height}: use at least 400×160.")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = chart_font(max(10, height // 32))
    head = title + ("  " if title else "") + f"pick: step {spot.step} · scale {spot.scale:g} · {spot.verdict}"
    draw.text((8, 4), head, fill=AXIS_TEXT, font=font)
    legend_y = height - 18
    x = 8
    for key in (*CURVE_KEYS, "val_loss"):
        draw.rectangle([x, legend_y + 3, x + 10, legend_y + 11], fill=COLOURS[key])
        draw.text((x + 14, legend_y), LABELS[key], fill=AXIS_TEXT, font=font)
        x += int(draw.textlength(LABELS[key], font=font)) + 30
    half = width // 2
    by_step = spot.curves.get("by_step", {})
    val = spot.curves.get("val_loss", {})
    _panel(draw, font, (0, 24, half, legend_y - 6), by_step.get("steps", []), by_step, val, spot.step, "step")
    by_scale = spot.curves.get("by_scale", {})
    _panel(draw, font, (half, 24, width, legend_y - 6), by_scale.get("scales", []), by_scale, {}, spot.scale, "scale")
    return img


def _panel(draw, font, box, xs, series, val, pick_x, axis: str) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 44, x1 - 12, y0 + 16, y1 - 22
    draw.text((left, y0), f"by {axis}", fill=AXIS_TEXT, font=font)
    vsteps, vvals = val.get("steps", []), val.get("values", [])
    all_x = [float(v) for v in list(xs) + list(vsteps)] or [0.0, 1.0]
    lo_x, hi_x = min(all_x), max(all_x)
    if hi_x == lo_x:
        lo_x, hi_x = lo_x - 1, hi_x + 1
    values = [v for k in CURVE_KEYS for v in series.get(k, []) if v is not None]
    lo_y, hi_y = min([0.0, *values]), max([1.0, *values])

    def px(v: float) -> float:
        return left + (v - lo_x) / (hi_x - lo_x) * (right - left)

    def py(v: float) -> float:
        return bottom - (min(max(v, lo_y), hi_y) - lo_y) / (hi_y - lo_y) * (bottom - top)

    for tick in nice_ticks(lo_y, hi_y, 4):
        draw.line([(left, py(tick)), (right, py(tick))], fill=GRID)
        draw.text((x0 + 4, py(tick) - 6), tick_label(tick), fill=AXIS_TEXT, font=font)
    for v in sorted(set(float(x) for x in xs)) or [lo_x, hi_x]:
        draw.text((px(v) - 8, bottom + 4), tick_label(v) if axis == "scale" else f"{int(v)}", fill=AXIS_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_TEXT)
    for level, key in ((MEMORISED_BELOW, "memorisation"), (TIMID_BELOW, "concept"), (LEAK_ABOVE, "trigger_free_drift")):
        for xa in range(int(left), int(right), 10):  # dashed threshold line in the colour of its measure
            draw.line([(xa, py(level)), (min(xa + 4, right), py(level))], fill=COLOURS[key])
    if vvals:  # the validation loss scaled into the panel (its own min..max)
        vlo, vhi = min(vvals), max(vvals)
        scaled = [(v - vlo) / (vhi - vlo) if vhi > vlo else 0.5 for v in vvals]
        _line(
            draw,
            [(px(s), py(lo_y + v * (hi_y - lo_y))) for s, v in zip(vsteps, scaled, strict=True)],
            COLOURS["val_loss"],
        )
    for key in CURVE_KEYS:
        pts = [(px(float(x)), py(v)) for x, v in zip(xs, series.get(key, []), strict=False) if v is not None]
        _line(draw, pts, COLOURS[key])
    if xs:
        xp = px(float(pick_x))
        draw.line([(xp, top), (xp, bottom)], fill=COLOURS["pick"], width=2)


def _line(draw, points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    elif points:
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
