"""Checkpoint scrubbing, pure logic: which frames to render, their labels, the labelled grid and the A/B compare.

A scrub renders the same seed at checkpoints × scales × prompts. The frame order is stable and documented:
**checkpoint-major, then scale, then prompt** — frame index = (c · S + s) · P + p for checkpoint c (ascending
step, or the order the LoRA files were given), scale s (in the order typed) and prompt p (line order). The grid
shows one row per checkpoint and one column per (scale, prompt) pair, so reading it row by row follows the frame
order. A sweep scrub (sweep_frame_plan) puts a run axis first: run, then checkpoint step, then scale, then
prompt, one grid row per (run, step). The mixer grid uses the same machinery with the axes scale_a × scale_b.

Nothing here imports ComfyUI; images are PIL images (the nodes convert IMAGE tensors at the edges).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import pack_error, shown
from .charts import chart_font

MAX_FRAMES = 256  # one scrub renders at most this many frames (each is a full sampling run)
SCALE_MIN, SCALE_MAX = -4.0, 4.0  # the LoRA strength range of the pack's loaders
MIN_CELL = 128  # grid cells smaller than this (tiny test renders) are enlarged by an integer factor
SEP = " · "
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")  # characters a frames folder name may not hold

_LAST = re.compile(r"^(last|first)\s+(\d+)$")
_EVERY = re.compile(r"^every\s+(\d+)(\s+steps?)?$")
_RANGE = re.compile(r"^(\d+)\s*(?:-|\.\.)\s*(\d+)$")


@pack_error
class ScrubError(ValueError):
    """An invalid scrub input; the message names the value and how to fix it."""


# ------------------------------------------------------------------------------------------------ selections


def _steps_text(available: Sequence[int]) -> str:
    return ", ".join(str(s) for s in available) if available else "none"


def select_checkpoints(text: str, available: Sequence[int]) -> list[int]:
    """The checkpoint steps a selection picks from a run's `available` steps, ascending, without duplicates.

    Terms, separated by commas (their union is taken): `all`; `last N` / `first N` (checkpoints);
    `every N` (every N-th checkpoint from the first: 1st, N+1-th, ...); `every N steps` (steps that are
    multiples of N); `A-B` or `A..B` (every checkpoint with A <= step <= B); a step number (must exist).
    """
    steps = sorted(set(available))
    if not steps:
        raise ScrubError("the run has no checkpoints yet: train it first (or pick another run).")
    terms = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not terms:
        raise ScrubError(
            f"the checkpoint selection is empty: type 'all', 'last 3', 'every 2', a range '300-900' or steps "
            f"'300,600'. This run has steps {_steps_text(steps)}."
        )
    picked: set[int] = set()
    for term in terms:
        picked.update(_select_term(term, steps))
    return sorted(picked)


def _select_term(term: str, steps: list[int]) -> list[int]:
    if term == "all":
        return steps
    if m := _LAST.match(term):
        n = int(m.group(2))
        if n < 1:
            raise ScrubError(f"{shown(term)}: N must be at least 1.")
        return steps[-n:] if m.group(1) == "last" else steps[:n]
    if m := _EVERY.match(term):
        n = int(m.group(1))
        if n < 1:
            raise ScrubError(f"{shown(term)}: N must be at least 1.")
        if m.group(2):
            hits = [s for s in steps if s % n == 0]
            if not hits:
                raise ScrubError(
                    f"{shown(term)}: no checkpoint step is a multiple of {n}; steps: {_steps_text(steps)}."
                )
            return hits
        return steps[::n]
    if m := _RANGE.match(term):
        lo, hi = sorted((int(m.group(1)), int(m.group(2))))
        hits = [s for s in steps if lo <= s <= hi]
        if not hits:
            raise ScrubError(f"{shown(term)}: no checkpoint between {lo} and {hi}; steps: {_steps_text(steps)}.")
        return hits
    if term.isdigit():
        if int(term) not in steps:
            raise ScrubError(f"step {term} has no checkpoint in this run; steps: {_steps_text(steps)}.")
        return [int(term)]
    raise ScrubError(
        f"{shown(term)} is not a checkpoint selection: use 'all', 'last N', 'first N', 'every N', 'every N steps', "
        f"a range 'A-B' or step numbers. Steps: {_steps_text(steps)}."
    )


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScrubError(f"{shown(text)} in the {what} is not a number.") from None
    if not math.isfinite(value):
        raise ScrubError(f"{shown(text)} in the {what} is not a finite number.")
    return value


def parse_scales(text: str, lo: float = SCALE_MIN, hi: float = SCALE_MAX, what: str = "scales") -> list[float]:
    """Scales from "0,0.5,1,2,4" and/or ranges "start:stop:step" (stop included), in the order typed, without
    duplicates. Every scale must lie in [lo, hi]."""
    values: list[float] = []
    terms = [t.strip() for t in text.split(",") if t.strip()]
    if not terms:
        raise ScrubError(f"the {what} are empty: type e.g. '0,0.5,1,2' or '0:4:0.5'.")
    for term in terms:
        parts = [p.strip() for p in term.split(":")]
        if len(parts) == 1:
            values.append(_number(parts[0], what))
            continue
        if len(parts) != 3:
            raise ScrubError(f"{shown(term)} in the {what}: a range is start:stop:step, e.g. 0:4:0.5.")
        start, stop, step = (_number(p, what) for p in parts)
        for end in (start, stop):
            if not lo <= end <= hi:
                raise ScrubError(
                    f"{shown(term)} in the {what} reaches {end:g}, outside {lo:g}..{hi:g}: use scales in that range."
                )
        span = (stop - start) / step if step != 0 else math.inf  # 1e-308 steps overflow to inf: refused below
        if step == 0 or span < 0:
            raise ScrubError(f"{shown(term)} in the {what}: the step {step:g} never reaches {stop:g} from {start:g}.")
        if not math.isfinite(span) or span + 1 > MAX_FRAMES:
            count_text = f"{span + 1:.3g}" if math.isfinite(span) else "too many"
            raise ScrubError(
                f"{shown(term)} in the {what} gives {count_text} values; at most {MAX_FRAMES}: use a larger step."
            )
        count = int(math.floor(span + 1e-9)) + 1
        if count > MAX_FRAMES:
            raise ScrubError(
                f"{shown(term)} in the {what} gives {count} values; at most {MAX_FRAMES}: use a larger step."
            )
        values.extend(round(start + i * step, 10) for i in range(count))
    out: list[float] = []
    for v in values:
        if not lo <= v <= hi:
            raise ScrubError(f"scale {v:g} in the {what} is outside {lo:g}..{hi:g}: use scales in that range.")
        v = v + 0.0  # -0.0 -> 0.0
        if v not in out:
            out.append(v)
    return out


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (surrounding spaces removed)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the frame plan


@dataclass(frozen=True)
class Checkpoint:
    """One LoRA of the checkpoint axis: its name in ComfyUI's loras list and its training step (if known)."""

    lora: str
    step: int | None


@dataclass(frozen=True)
class Frame:
    index: int
    coords: tuple[int, ...]  # index into each axis' values
    lora: str | None
    step: int | None
    scale: float
    prompt: str
    prompt_index: int
    label: str

    def record(self) -> dict:
        """The frame's entry of the labels JSON."""
        return {
            "index": self.index,
            "step": self.step,
            "scale": self.scale,
            "prompt": self.prompt,
            "label": self.label,
            "lora": self.lora,
        }


def fmt_scale(value: float) -> str:
    return f"{value:g}"


def lora_display(checkpoint: Checkpoint) -> str:
    """How a checkpoint is named in labels: its step, else its file name without folders and extension."""
    if checkpoint.step is not None:
        return f"step {checkpoint.step}"
    return short_name(checkpoint.lora)


def frame_label(checkpoint: Checkpoint, scale: float, prompt_index: int, n_prompts: int) -> str:
    """ "step 600 · scale 1.5 · prompt 2" (the prompt part only when there are several prompts; 1-based)."""
    parts = [lora_display(checkpoint), f"scale {fmt_scale(scale)}"]
    if n_prompts > 1:
        parts.append(f"prompt {prompt_index + 1}")
    return SEP.join(parts)


def check_frame_count(count: int, max_frames: int = MAX_FRAMES) -> None:
    if count > max_frames:
        raise ScrubError(
            f"{count} frames requested; one scrub renders at most {max_frames}. Pick fewer checkpoints "
            "(e.g. 'every 2'), scales or prompts."
        )
    if count < 1:
        raise ScrubError("nothing to render: the selection gives no frame.")


def frame_plan(checkpoints: Sequence[Checkpoint], scales: Sequence[float], prompts: Sequence[str]) -> list[Frame]:
    """Every frame in the stable order: checkpoint-major, then scale, then prompt (see the module doc)."""
    if not prompts:
        raise ScrubError("no prompt: type one prompt per line (or connect a positive conditioning).")
    check_frame_count(len(checkpoints) * len(scales) * len(prompts))
    frames = []
    for c, ckpt in enumerate(checkpoints):
        for s, scale in enumerate(scales):
            for p, prompt in enumerate(prompts):
                label = frame_label(ckpt, scale, p, len(prompts))
                frames.append(Frame(len(frames), (c, s, p), ckpt.lora, ckpt.step, scale, prompt, p, label))
    return frames


def scrub_axes(checkpoints: Sequence[Checkpoint], scales: Sequence[float], prompts: Sequence[str]) -> list[dict]:
    """The axes of the UI metadata: step (or lora, when the checkpoints have no steps), scale, prompt."""
    if all(c.step is not None for c in checkpoints):
        first = {"name": "step", "values": [c.step for c in checkpoints]}
    else:
        first = {"name": "lora", "values": [c.lora for c in checkpoints]}
    return [first, {"name": "scale", "values": list(scales)}, {"name": "prompt", "values": list(prompts)}]


@dataclass(frozen=True)
class SweepRunCheckpoints:
    """One run of a sweep on the run axis: its label ("learning_rate=1e-05"), its folder name and its selected
    checkpoints (ascending steps)."""

    label: str
    run: str
    checkpoints: tuple[Checkpoint, ...]


@dataclass(frozen=True)
class SweepFrame(Frame):
    """A frame of a sweep scrub: a Frame plus the run it shows. `step` is the checkpoint actually rendered; the
    step axis value (coords[1]) may be later when this run ended earlier (it then shows its last checkpoint)."""

    run_label: str = ""
    run: str = ""

    def record(self) -> dict:
        return {**super().record(), "run": self.run, "run_label": self.run_label}


def sweep_steps(runs: Sequence[SweepRunCheckpoints]) -> list[int]:
    """The step axis of a sweep scrub: every selected step of any run, ascending."""
    steps = {c.step for r in runs for c in r.checkpoints}
    if None in steps:
        raise ScrubError("a sweep's checkpoints must carry their steps (step_000600.safetensors names).")
    return sorted(steps)


def checkpoint_at(run: SweepRunCheckpoints, step: int) -> Checkpoint:
    """The run's checkpoint at `step`; a run that ended before it (a shorter run of a steps sweep) gives its last
    checkpoint before `step`, and a run whose first checkpoint comes later gives that first one."""
    by_step = {c.step: c for c in run.checkpoints}
    if step in by_step:
        return by_step[step]
    earlier = [c for c in run.checkpoints if c.step < step]
    return earlier[-1] if earlier else run.checkpoints[0]


def sweep_frame_plan(
    runs: Sequence[SweepRunCheckpoints], scales: Sequence[float], prompts: Sequence[str]
) -> list[SweepFrame]:
    """Every frame of a sweep scrub in the stable order **run, then checkpoint step, then scale, then prompt**:
    frame index = ((r · C + c) · S + s) · P + p, runs in the sweep's order, steps the union of every run's
    selected steps. Labels read "learning_rate=1e-05 · step 600 · scale 1" (the knob and value first); a run that
    ended before a step shows its last checkpoint, labelled with that checkpoint's own step and "(last)"."""
    if not runs:
        raise ScrubError("the sweep has no runs: train it first.")
    empty = [r.run for r in runs if not r.checkpoints]
    if empty:
        raise ScrubError(f"run '{empty[0]}' of the sweep has no checkpoint yet: queue the sweep to train it.")
    if not prompts:
        raise ScrubError("no prompt: type one prompt per line (or connect a positive conditioning).")
    steps = sweep_steps(runs)
    check_frame_count(len(runs) * len(steps) * len(scales) * len(prompts))
    frames: list[SweepFrame] = []
    for r, run in enumerate(runs):
        for c, step in enumerate(steps):
            ckpt = checkpoint_at(run, step)
            shown = lora_display(ckpt) + ("" if ckpt.step == step else " (last)")
            for s, scale in enumerate(scales):
                for p, prompt in enumerate(prompts):
                    parts = [run.label, shown, f"scale {fmt_scale(scale)}"]
                    if len(prompts) > 1:
                        parts.append(f"prompt {p + 1}")
                    coords = (r, c, s, p)
                    frames.append(
                        SweepFrame(
                            len(frames),
                            coords,
                            ckpt.lora,
                            ckpt.step,
                            scale,
                            prompt,
                            p,
                            SEP.join(parts),
                            run.label,
                            run.run,
                        )
                    )
    return frames


def sweep_axes(runs: Sequence[SweepRunCheckpoints], scales: Sequence[float], prompts: Sequence[str]) -> list[dict]:
    """The axes of a sweep scrub's UI metadata: run (labels naming knob and value), step, scale, prompt."""
    return [
        {"name": "run", "values": [r.label for r in runs]},
        {"name": "step", "values": sweep_steps(runs)},
        {"name": "scale", "values": list(scales)},
        {"name": "prompt", "values": list(prompts)},
    ]


@dataclass(frozen=True)
class MixFrame:
    """One cell of the mixer grid: LoRA A at scale_a together with LoRA B at scale_b."""

    index: int
    coords: tuple[int, int]
    scale_a: float
    scale_b: float
    label: str

    def record(self, lora_a: str, lora_b: str, prompt: str) -> dict:
        """The frame's entry of the labels JSON."""
        return {
            "index": self.index,
            "scale_a": self.scale_a,
            "scale_b": self.scale_b,
            "prompt": prompt,
            "label": self.label,
            "lora_a": lora_a,
            "lora_b": lora_b,
        }


def mixer_plan(name_a: str, name_b: str, scales_a: Sequence[float], scales_b: Sequence[float]) -> list[MixFrame]:
    """The mixer grid's frames, scale_a-major then scale_b (rows = scale of A, columns = scale of B); labels
    read "A 0.5 · B 1" with A and B the short names of the two LoRAs."""
    check_frame_count(len(scales_a) * len(scales_b))
    frames = []
    for i, sa in enumerate(scales_a):
        for j, sb in enumerate(scales_b):
            label = f"{name_a} {fmt_scale(sa)}{SEP}{name_b} {fmt_scale(sb)}"
            frames.append(MixFrame(len(frames), (i, j), sa, sb, label))
    return frames


def scrub_headers(
    checkpoints: Sequence[Checkpoint], scales: Sequence[float], prompts: Sequence[str], title: str
) -> tuple[list[str], list[str], str]:
    """(row headers, column headers, title) of a scrub grid: one row per checkpoint, one column per (scale,
    prompt); with a single prompt the columns are the scales and the prompt joins the title."""
    if len(prompts) > 1:
        cols = [f"scale {fmt_scale(s)}{SEP}prompt {p + 1}" for s in scales for p in range(len(prompts))]
    else:
        cols = [f"scale {fmt_scale(s)}" for s in scales]
        title = f"{title}{SEP}{prompts[0]}"
    return [lora_display(c) for c in checkpoints], cols, title


def short_name(lora: str) -> str:
    """A LoRA's file name without folders and extension (what the mixer grid's labels call it)."""
    base = lora.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def grid_names(lora_a: str, lora_b: str) -> tuple[str, str]:
    """Label names of A and B; two checkpoints with the same file name (step_000600 of two runs) get A/B marks."""
    a, b = short_name(lora_a), short_name(lora_b)
    return (a, b) if a != b else (f"A {a}", f"B {b}")


def mixer_folder_name(name_a: str, name_b: str) -> str:
    """`mixer_<A>_x_<B>` with only filename-safe characters (the grid's folder under output/.../scrub)."""
    return "mixer_" + _UNSAFE.sub("_", f"{name_a}_x_{name_b}")[:96].strip("._")


def inputs_key(parts: Mapping[str, object]) -> str:
    """8 hex digits identifying a render's inputs (the frames' folder name): same inputs, same folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------------ images


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _enlarge(image: Image.Image, factor: int) -> Image.Image:
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _cell_factor(width: int, height: int) -> int:
    return max(1, math.ceil(MIN_CELL / max(width, height)))


def compose_grid(
    cells: Sequence[Image.Image],
    cols: int,
    labels: Sequence[str],
    row_headers: Sequence[str],
    col_headers: Sequence[str],
    title: str = "",
) -> Image.Image:
    """Cells in row-major order (len = rows · cols) as one labelled grid: a title line, a header above each column,
    a header left of each row, and each cell's label in a strip under it. Small cells are enlarged (nearest) to
    at least MIN_CELL px so the labels stay readable."""
    if not cells or len(cells) % cols:
        raise ScrubError(f"{len(cells)} cells do not fill a grid of {cols} columns.")
    rows = len(cells) // cols
    if len(labels) != len(cells) or len(row_headers) != rows or len(col_headers) != cols:
        raise ScrubError("grid labels and headers do not match the number of cells, rows and columns.")
    factor = _cell_factor(cells[0].width, cells[0].height)
    cw, ch = cells[0].width * factor, cells[0].height * factor
    size = max(11, min(28, cw // 14))
    font = chart_font(size)
    pad = max(2, size // 4)
    line = size + 2 * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_w = min(int(max(probe.textlength(h, font=font) for h in row_headers)) + 2 * pad, cw)
    top = line * (2 if title else 1)
    grid = Image.new("RGB", (row_w + cols * cw, top + rows * (ch + line)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), _fit(draw, title, font, grid.width - 2 * pad), fill="black", font=font)
    for c, header in enumerate(col_headers):
        draw.text((row_w + c * cw + pad, top - line + pad), _fit(draw, header, font, cw - 2 * pad), "black", font)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        x, y = row_w + c * cw, top + r * (ch + line)
        grid.paste(_enlarge(cell.convert("RGB"), factor).resize((cw, ch), Image.NEAREST), (x, y))
        draw.text((x + pad, y + ch + pad), _fit(draw, labels[i], font, cw - 2 * pad), fill="black", font=font)
    for r, header in enumerate(row_headers):
        y = top + r * (ch + line) + ch // 2 - size // 2
        draw.text((pad, y), _fit(draw, header, font, row_w - 2 * pad), fill="black", font=font)
    return grid


def thumbnail(image: Image.Image, longest: int) -> Image.Image:
    """A copy whose longest side is at most `longest` px (aspect kept; never enlarged)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((longest, longest), Image.LANCZOS)
    return thumb


def abs_difference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """|a - b| per pixel ([H, W, 3], 0..1) and its mean; both images must have the same size."""
    if a.shape != b.shape:
        raise ScrubError(f"frames of different sizes ({a.shape[1]}×{a.shape[0]} vs {b.shape[1]}×{b.shape[0]}).")
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
    return diff, float(diff.mean())


def compose_side_by_side(a: Image.Image, b: Image.Image, label_a: str, label_b: str) -> Image.Image:
    """A | B with each frame's label above it ("A: step 1000 · scale 1", "B: ...")."""
    factor = _cell_factor(a.width, a.height)
    w, h = a.width * factor, a.height * factor
    size = max(11, min(28, w // 14))
    font = chart_font(size)
    pad = max(2, size // 4)
    line = size + 2 * pad
    gap = max(4, w // 64)
    out = Image.new("RGB", (2 * w + gap, h + line), "white")
    draw = ImageDraw.Draw(out)
    for k, (image, label) in enumerate(((a, f"A: {label_a}"), (b, f"B: {label_b}"))):
        x = k * (w + gap)
        out.paste(_enlarge(image.convert("RGB"), factor).resize((w, h), Image.NEAREST), (x, line))
        draw.text((x + pad, pad), _fit(draw, label, font, w - 2 * pad), fill="black", font=font)
    return out


def find_frame(labels: Sequence[Mapping], index: int, label_text: str) -> int:
    """The position of a frame in the batch: by label text when given (exact, else a unique substring match),
    else by `index`. Errors list what exists."""
    if label_text.strip():
        want = label_text.strip()
        exact = [i for i, rec in enumerate(labels) if rec.get("label") == want]
        hits = exact or [i for i, rec in enumerate(labels) if want.lower() in str(rec.get("label", "")).lower()]
        if len(hits) == 1:
            return hits[0]
        known = "; ".join(str(rec.get("label")) for rec in labels[:12]) + (" ..." if len(labels) > 12 else "")
        what = "matches no frame" if not hits else f"matches {len(hits)} frames"
        raise ScrubError(f"label '{want}' {what}: give a full label. Labels: {known}")
    if not 0 <= index < len(labels):
        raise ScrubError(f"frame index {index} does not exist: the batch has frames 0..{len(labels) - 1}.")
    return index
