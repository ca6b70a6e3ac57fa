"""The scrubber's run axis (a sweep scrub: run × step × scale) in the real ComfyUI frontend, classic canvas and Vue
nodes (tests/browser/sweep_scrub.mjs).

A sweep result, planned by the node's own code (trainer_core.analysis.scrub.sweep_frame_plan / sweep_axes) with a
distinct labelled image per frame written into the server's output folder, is delivered to a KleinLabScrubRun
node as the server sends it; the mouse drags the run and step sliders and sets A and B on two different runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness.browser import ARTIFACTS, run_driver

MODES = ("classic", "vue")
SUBFOLDER = "klein_lora_lab/scrub/sweep-browser_test/0123abcd"
LABELS = ["learning_rate=1e-05", "learning_rate=5e-05", "learning_rate=0.0002"]
STEPS = (200, 400)
SCALES = (0.0, 1.0)


def sweep_meta(output_dir: Path) -> dict[str, Any]:
    """3 runs × 2 checkpoints × 2 scales in the node's order and labels, with one PNG per frame behind it."""
    from klein_lora_lab.trainer_core.analysis.scrub import (
        Checkpoint,
        SweepRunCheckpoints,
        sweep_axes,
        sweep_frame_plan,
    )
    from PIL import Image, ImageDraw

    runs = [
        SweepRunCheckpoints(
            label, f"lr-{i}", tuple(Checkpoint(f"lr-{i}/checkpoints/step_{s:06d}.safetensors", s) for s in STEPS)
        )
        for i, label in enumerate(LABELS)
    ]
    frames = sweep_frame_plan(runs, list(SCALES), ["a TOK cat"])
    folder = output_dir / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for f in frames:
        image = Image.new("RGB", (192, 192), ((f.index * 53) % 256, 90, 255 - (f.index * 53) % 256))
        ImageDraw.Draw(image).text((6, 6), f.label, fill="white")
        image.save(folder / f"frame_{f.index:04d}.png")
        image.resize((48, 48)).save(folder / f"thumb_{f.index:04d}.jpg")
        ref = {"subfolder": SUBFOLDER, "type": "output"}
        records.append(
            {
                "index": f.index,
                "coords": list(f.coords),
                "label": f.label,
                "image": {"filename": f"frame_{f.index:04d}.png", **ref},
                "thumb": {"filename": f"thumb_{f.index:04d}.jpg", **ref},
            }
        )
    axes = sweep_axes(runs, list(SCALES), ["a TOK cat"])
    grid = {"filename": "frame_0000.png", "subfolder": SUBFOLDER, "type": "output"}
    return {"version": 1, "node": "KleinLabScrubRun", "axes": axes, "frames": records, "grid": grid}


@pytest.fixture(scope="module")
def sweep_case(comfy_server, tmp_path_factory) -> dict[str, Any]:
    meta = sweep_meta(comfy_server.base_dir / "output")
    config = tmp_path_factory.mktemp("sweep_scrub") / "config.json"
    config.write_text(json.dumps({"meta": meta}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLEIN_LAB_SWEEP_SCRUB_CONFIG", str(config))
        result = run_driver("sweep_scrub.mjs", comfy_server.url, timeout_s=300)
    return {"meta": meta, "result": result}


def index_of(meta: dict[str, Any], run: int, step: int, scale: int) -> int:
    return next(i for i, f in enumerate(meta["frames"]) if f["coords"][:3] == [run, step, scale])


def shows(meta: dict[str, Any], obs: dict[str, Any], expected: int) -> None:
    """The widget shows frame `expected`: its index, its label naming the run's knob=value, its image loaded."""
    frame = meta["frames"][expected]
    assert obs["frame"] == expected, (obs["frame"], expected)
    assert obs["label"] == frame["label"]
    assert f"filename={frame['image']['filename']}" in obs["src"] and obs["loaded"]


def test_no_page_errors_from_the_pack(sweep_case) -> None:
    """Delivering and driving a sweep result logs no page error that mentions the pack or the scrubber."""
    errors = sweep_case["result"]["pageErrors"]
    assert [e for e in errors if "klein" in e.lower() or "scrub" in e.lower()] == []


@pytest.mark.parametrize("mode", MODES)
def test_run_axis_slider(sweep_case, mode: str) -> None:
    """A sweep result gets one slider per varying axis, fastest first (scale, step, run); dragging the run slider
    to its end and its middle moves between runs keeping step and scale, the step slider keeps the run, and the
    axis readouts name the run by knob=value."""
    r, meta = sweep_case["result"]["modes"][mode], sweep_case["meta"]
    assert r["inVueNode"] is (mode == "vue") and r["delivered"] == "api"
    shows(meta, r["initial"], 0)
    assert r["initial"]["axisSliders"] == ["scale", "step", "run"]
    shows(meta, r["runEnd"], index_of(meta, 2, 0, 0))
    assert r["runEnd"]["axisValues"] == ["scale 0", "step 200", f"run {LABELS[2]}"]
    shows(meta, r["runMid"], index_of(meta, 1, 0, 0))
    shows(meta, r["stepEnd"], index_of(meta, 1, 1, 0))
    assert r["stepEnd"]["label"] == f"{LABELS[1]} · step 400 · scale 0"
    assert (ARTIFACTS / f"sweep-scrub-{mode}.png").stat().st_size > 0


@pytest.mark.parametrize("mode", MODES)
def test_ab_across_runs(sweep_case, mode: str) -> None:
    """A on the first run and B on the last (same step and scale), side by side: both images and both labels, each
    naming its learning rate."""
    r, meta = sweep_case["result"]["modes"][mode], sweep_case["meta"]
    a, b = meta["frames"][index_of(meta, 0, 1, 0)], meta["frames"][index_of(meta, 2, 1, 0)]
    ab = r["abRuns"]
    assert ab["aLabel"] == f"A: {a['label']}" and ab["bLabel"] == f"B: {b['label']}"
    assert LABELS[0] in ab["aLabel"] and LABELS[2] in ab["bLabel"]
    assert a["image"]["filename"] in ab["src"] and b["image"]["filename"] in ab["srcB"]
