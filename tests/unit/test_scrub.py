"""Scrub logic without ComfyUI: checkpoint selections, scales, the frame order, labels, grid and A/B images."""

from __future__ import annotations

import numpy as np
import pytest
from klein_lora_lab.trainer_core.analysis.scrub import (
    MAX_FRAMES,
    MIN_CELL,
    Checkpoint,
    ScrubError,
    abs_difference,
    compose_grid,
    compose_side_by_side,
    find_frame,
    frame_plan,
    inputs_key,
    mixer_plan,
    parse_prompts,
    parse_scales,
    scrub_axes,
    select_checkpoints,
    thumbnail,
)
from PIL import Image

STEPS = [300, 600, 900, 1200, 1500, 1800]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", STEPS),
        ("last 2", [1500, 1800]),
        ("first 2", [300, 600]),
        ("every 2", [300, 900, 1500]),
        ("every 600 steps", [600, 1200, 1800]),
        ("600-1200", [600, 900, 1200]),
        ("1200..600", [600, 900, 1200]),
        ("1800, 300,600", [300, 600, 1800]),
        ("300, last 1, 600-900", [300, 600, 900, 1800]),
        ("LAST 10", STEPS),
    ],
)
def test_checkpoint_selection(text: str, expected: list[int]) -> None:
    """Each selection form picks exactly the documented steps, ascending and without duplicates."""
    assert select_checkpoints(text, STEPS) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("  ,  ", "empty"),
        ("700", "step 700 has no checkpoint"),
        ("1900-2500", "no checkpoint between 1900 and 2500"),
        ("every 7 steps", "multiple of 7"),
        ("sometimes", "is not a checkpoint selection"),
        ("last 0", "at least 1"),
    ],
)
def test_checkpoint_selection_errors_list_existing_steps(text: str, needle: str) -> None:
    """A selection that picks nothing names the problem and lists the run's real steps."""
    with pytest.raises(ScrubError) as err:
        select_checkpoints(text, STEPS)
    assert needle in str(err.value)
    if needle != "at least 1":
        assert "300, 600, 900, 1200, 1500, 1800" in str(err.value)


def test_run_without_checkpoints_is_refused() -> None:
    """An empty run cannot be scrubbed; the error says to train it first."""
    with pytest.raises(ScrubError, match="no checkpoints"):
        select_checkpoints("all", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,0.5,1,2,4", [0.0, 0.5, 1.0, 2.0, 4.0]),
        ("0:4:0.5", [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
        ("0:1:0.1", [round(0.1 * i, 10) for i in range(11)]),
        ("2, 0:1:0.5, 1", [2.0, 0.0, 0.5, 1.0]),
        ("1:-1:-1", [1.0, 0.0, -1.0]),
        ("-0", [0.0]),
    ],
)
def test_parse_scales(text: str, expected: list[float]) -> None:
    """Lists and inclusive ranges give the typed order without duplicates (ranges include their stop)."""
    assert parse_scales(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("0,5", "outside -4..4"),
        ("0:1", "start:stop:step"),
        ("0:1:0", "never reaches"),
        ("1:0:0.5", "never reaches"),
        ("a", "not a number"),
        ("nan", "not a finite number"),
        ("0:4:0.001", "at most"),
    ],
)
def test_parse_scales_errors(text: str, needle: str) -> None:
    """Bad scales are refused with a message naming the value and the allowed form or range."""
    with pytest.raises(ScrubError, match=needle):
        parse_scales(text)


def test_prompts_one_per_line() -> None:
    """Blank lines are ignored and spaces trimmed; the order is kept."""
    assert parse_prompts("a TOK cat\n\n  a TOK dog  \n") == ["a TOK cat", "a TOK dog"]


def test_frame_plan_is_checkpoint_major_then_scale_then_prompt() -> None:
    """Frame index = (c·S + s)·P + p, coords index the axes, and labels name step, scale and prompt."""
    ckpts = [Checkpoint("run/checkpoints/step_000300.safetensors", 300), Checkpoint("run/c/step_000600.x", 600)]
    scales, prompts = [0.0, 1.5, 2.0], ["a TOK cat", "a bicycle"]
    frames = frame_plan(ckpts, scales, prompts)
    assert len(frames) == 12
    for f in frames:
        c, s, p = f.coords
        assert f.index == (c * len(scales) + s) * len(prompts) + p
        assert (f.step, f.scale, f.prompt, f.lora) == (ckpts[c].step, scales[s], prompts[p], ckpts[c].lora)
    assert frames[3].label == "step 300 · scale 1.5 · prompt 2"
    rec = frames[3].record()
    assert rec == {
        "index": 3,
        "step": 300,
        "scale": 1.5,
        "prompt": "a bicycle",
        "label": "step 300 · scale 1.5 · prompt 2",
        "lora": ckpts[0].lora,
    }
    axes = scrub_axes(ckpts, scales, prompts)
    assert [a["name"] for a in axes] == ["step", "scale", "prompt"]
    assert axes[0]["values"] == [300, 600]


def test_single_prompt_labels_and_lora_file_axis() -> None:
    """With one prompt the label has no prompt part; LoRA files without a step are named by file stem."""
    frames = frame_plan([Checkpoint("styles/my_style.safetensors", None)], [1.0], ["p"])
    assert frames[0].label == "my_style · scale 1"
    assert scrub_axes([Checkpoint("styles/my_style.safetensors", None)], [1.0], ["p"])[0] == {
        "name": "lora",
        "values": ["styles/my_style.safetensors"],
    }


def test_frame_cap() -> None:
    """More than MAX_FRAMES frames is refused with a message saying the cap and how to reduce."""
    ckpts = [Checkpoint(f"s{i}", i) for i in range(MAX_FRAMES // 2 + 1)]
    with pytest.raises(ScrubError, match=f"at most {MAX_FRAMES}"):
        frame_plan(ckpts, [0.0, 1.0], ["p"])
    with pytest.raises(ScrubError, match="no prompt"):
        frame_plan(ckpts[:1], [1.0], [])


def test_mixer_plan_order_and_labels() -> None:
    """Mixer frames are scale_a-major; labels name both LoRAs with their scales."""
    frames = mixer_plan("TOK", "TOKSTYLE", [0.0, 1.0], [0.5, 1.0, 2.0])
    assert [(f.scale_a, f.scale_b) for f in frames] == [(a, b) for a in (0.0, 1.0) for b in (0.5, 1.0, 2.0)]
    assert frames[4].label == "TOK 1 · TOKSTYLE 1"
    assert frames[4].coords == (1, 1)
    assert frames[4].record("a.safetensors", "b.safetensors", "p")["scale_b"] == 1.0


def test_inputs_key_is_stable_and_sensitive() -> None:
    """Same inputs give the same 8-hex folder; any changed input gives another one."""
    a = inputs_key({"seed": 1, "scales": [0, 1]})
    assert a == inputs_key({"scales": [0, 1], "seed": 1})
    assert len(a) == 8 and int(a, 16) >= 0
    assert a != inputs_key({"seed": 2, "scales": [0, 1]})


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_grid_places_cells_in_row_major_order_with_labels() -> None:
    """Each cell appears at its row/column (enlarged to at least MIN_CELL), and the label strips hold text."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    cells = [_solid(c) for c in colors]
    labels = [f"step {r} · scale {c}" for r in (1, 2) for c in (0, 1, 2)]
    grid = compose_grid(cells, 3, labels, ["step 1", "step 2"], ["scale 0", "scale 1", "scale 2"], title="run x")
    arr = np.asarray(grid)
    factor = -(-MIN_CELL // 64)
    cw, ch = 64 * factor, 48 * factor
    left = grid.width - 3 * cw
    line = (grid.height - 2 * ch) // 4  # title + header lines, and one label strip per row
    for i, color in enumerate(colors):
        r, c = divmod(i, 3)
        y = 2 * line + r * (ch + line) + ch // 2
        x = left + c * cw + cw // 2
        assert tuple(arr[y, x]) == color
        strip = arr[
            2 * line + r * (ch + line) + ch : 2 * line + (r + 1) * (ch + line), left + c * cw : left + (c + 1) * cw
        ]
        assert (strip < 128).any()  # dark label text in the white strip
    assert (arr[:, :left] < 128).any()  # row headers


def test_grid_rejects_mismatched_labels() -> None:
    """Cells, labels and headers must agree in count."""
    with pytest.raises(ScrubError):
        compose_grid([_solid((0, 0, 0))] * 4, 3, ["a"] * 4, ["r"], ["c"] * 3)
    with pytest.raises(ScrubError):
        compose_grid([_solid((0, 0, 0))] * 4, 2, ["a"] * 3, ["r"] * 2, ["c"] * 2)


def test_thumbnail_longest_side() -> None:
    """Thumbnails keep the aspect ratio with the longest side capped, and never enlarge."""
    assert thumbnail(_solid((1, 2, 3), (640, 320)), 192).size == (192, 96)
    assert thumbnail(_solid((1, 2, 3), (64, 32)), 192).size == (64, 32)


def test_abs_difference_and_side_by_side() -> None:
    """The difference is |A−B| per pixel with its mean; equal frames give 0; A is left, B is right."""
    a, b = _solid((200, 100, 0)), _solid((100, 100, 50))
    diff, mean = abs_difference(to_array(a), to_array(b))
    assert diff.shape == (48, 64, 3)
    assert mean == pytest.approx((100 + 0 + 50) / 3 / 255, abs=1e-6)
    assert abs_difference(to_array(a), to_array(a))[1] == 0.0
    with pytest.raises(ScrubError, match="different sizes"):
        abs_difference(to_array(a), to_array(_solid((0, 0, 0), (32, 32))))
    pair = np.asarray(compose_side_by_side(a, b, "step 1", "step 2"))
    y = pair.shape[0] - 5
    assert tuple(pair[y, 5]) == (200, 100, 0)
    assert tuple(pair[y, pair.shape[1] - 5]) == (100, 100, 50)


def test_find_frame_by_index_or_label() -> None:
    """A label picks its frame (exact or unique substring); an unknown label or index lists what exists."""
    labels = [{"label": "step 300 · scale 1"}, {"label": "step 600 · scale 1"}, {"label": "step 600 · scale 2"}]
    assert find_frame(labels, 0, "step 600 · scale 2") == 2
    assert find_frame(labels, 0, "300") == 0
    assert find_frame(labels, 1, "") == 1
    with pytest.raises(ScrubError, match="matches 2 frames"):
        find_frame(labels, 0, "step 600")
    with pytest.raises(ScrubError, match="matches no frame"):
        find_frame(labels, 0, "step 900")
    with pytest.raises(ScrubError, match="0..2"):
        find_frame(labels, 3, "")


# ------------------------------------------------------------------------------------------------ sweep scrub


def _sweep_runs(ends: dict[str, int], every: int = 300):
    from klein_lora_lab.trainer_core.analysis.scrub import SweepRunCheckpoints

    return [
        SweepRunCheckpoints(
            label,
            f"s-{i}",
            tuple(Checkpoint(f"s-{i}/checkpoints/step_{s:06d}.safetensors", s) for s in range(every, end + 1, every)),
        )
        for i, (label, end) in enumerate(ends.items())
    ]


def test_sweep_frames_are_run_major_with_knob_labels() -> None:
    """A sweep scrub orders frames run, then step, then scale, then prompt (index = ((r·C + c)·S + s)·P + p); every
    label starts with knob=value; the axes are run, step, scale, prompt."""
    from klein_lora_lab.trainer_core.analysis.scrub import sweep_axes, sweep_frame_plan

    runs = _sweep_runs({"learning_rate=1e-05": 600, "learning_rate=5e-05": 600, "learning_rate=0.0002": 600})
    scales, prompts = [0.5, 1.0], ["a TOK cat", "a TOK bicycle"]
    frames = sweep_frame_plan(runs, scales, prompts)
    assert len(frames) == 3 * 2 * 2 * 2
    for f in frames:
        r, c, s, p = f.coords
        assert f.index == ((r * 2 + c) * 2 + s) * 2 + p
        assert f.label.startswith(runs[r].label + " · step ")
        assert f.lora.startswith(f"s-{r}/") and f.step == (c + 1) * 300
    assert frames[15].label == "learning_rate=5e-05 · step 600 · scale 1 · prompt 2"
    assert frames[15].record()["run"] == "s-1" and frames[15].record()["run_label"] == "learning_rate=5e-05"
    axes = sweep_axes(runs, scales, prompts)
    assert [a["name"] for a in axes] == ["run", "step", "scale", "prompt"]
    assert axes[0]["values"] == [r.label for r in runs] and axes[1]["values"] == [300, 600]


def test_steps_sweep_fills_missing_checkpoints_with_the_runs_last() -> None:
    """In a steps sweep the shorter runs end early: the step axis is the union of steps, and a run shows its last
    checkpoint where it has none, labelled with that checkpoint's step and '(last)'."""
    from klein_lora_lab.trainer_core.analysis.scrub import sweep_frame_plan

    runs = _sweep_runs({"steps=300": 300, "steps=900": 900})
    frames = sweep_frame_plan(runs, [1.0], ["p"])
    assert [(f.coords[:2], f.step) for f in frames] == [
        ((0, 0), 300),
        ((0, 1), 300),
        ((0, 2), 300),
        ((1, 0), 300),
        ((1, 1), 600),
        ((1, 2), 900),
    ]
    assert frames[1].label == "steps=300 · step 300 (last) · scale 1"
    assert frames[4].label == "steps=900 · step 600 · scale 1"


def test_sweep_plan_refuses_empty_runs_and_too_many_frames() -> None:
    """A run without checkpoints names the run and says to queue the sweep; the frame cap covers the run axis."""
    from klein_lora_lab.trainer_core.analysis.scrub import SweepRunCheckpoints, sweep_frame_plan

    runs = _sweep_runs({"rank=8": 300})
    with pytest.raises(ScrubError, match="run 's-9' of the sweep has no checkpoint"):
        sweep_frame_plan([*runs, SweepRunCheckpoints("rank=16", "s-9", ())], [1.0], ["p"])
    many = _sweep_runs({f"rank={i}": 3000 for i in range(3)})
    with pytest.raises(ScrubError, match="frames requested"):
        sweep_frame_plan(many, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 2.5, 3.5], ["p"])
