"""Klein Sweep through the real ComfyUI server on the tiny Klein: a 3-value learning-rate sweep queued with
/prompt, cancelled in its second run (right after that run's first checkpoint, by a test node: never a matter of
timing), queued again to completion; each run equals the run the Train node trains alone with the same settings
(bit for bit); the scrub of the sweep has runs × checkpoints frames in a stable
order labelled knob=value; the sweep curves node draws every run on one chart with a reading in words.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, train_prompt, with_defaults
from harness.server import TINY_MODEL_NAME, VAE_NAME
from harness.workflow_prompt import make_album
from harness.ws_events import EventListener
from PIL import Image
from safetensors.torch import load_file

SWEEP = "lr"
VALUES = (1e-3, 2e-3, 5e-3)
LABELS = ["learning_rate=0.001", "learning_rate=0.002", "learning_rate=0.005"]
RUNS = [f"lr-learning_rate-{v:g}" for v in VALUES]
STEPS = 8
EVERY = 1
CANCEL_AT = 1  # the Cancel lands right after this checkpoint of the second run
VALIDATE = 4  # validation loss at steps 4 and 8: the sweep curves read it


def sweep_prompt(album: Path, cond_file: Path) -> dict[str, Any]:
    """The training graph of harness.prompts with the Train node replaced by a Sweep over the learning rate; the
    other widgets are the Train node's in train_prompt, so a run of the sweep is that prompt's run. The MODEL goes
    through the test node that presses Cancel after checkpoint CANCEL_AT of the second run (it fires once; queued
    again, the second run resumes past that checkpoint, so nothing cancels)."""
    prompt = {k: v for k, v in train_prompt(album, cond_file, "unused", STEPS).items() if k in "12345"}
    prompt["7"] = {
        "class_type": "KleinLabTestCancelAtCheckpoint",
        "inputs": {"model": ["1", 0], "run_name": RUNS[1], "step": CANCEL_AT},
    }
    prompt["6"] = {
        "class_type": "KleinLabSweep",
        "inputs": {
            "model": ["7", 0],
            "encoded_dataset": ["5", 0],
            "sweep_name": SWEEP,
            "knob": "learning_rate",
            "values": ", ".join(f"{v:g}" for v in VALUES),
            "preset": "style",
            "rank": 4,
            "alpha": 0.0,
            "learning_rate": 0.0,
            "steps": STEPS,
            "batch_size": 1,
            "checkpoint_every": EVERY,
            "sample_every": 0,
            "sample_steps": 2,
            "sample_cfg": 1.0,
            "seed": 3,
            "targets": "attention",
            "validation_every": VALIDATE,
            "validation_holdout": 0.0,
            "vae": ["2", 0],
        },
    }
    return prompt


def alone_prompt(album: Path, cond_file: Path, run: str, lr: float) -> dict[str, Any]:
    """The Train node alone with the sweep's widgets and one of its learning rates."""
    prompt = train_prompt(album, cond_file, run, STEPS, checkpoint_every=EVERY, sample_every=0)
    prompt["6"]["inputs"]["learning_rate"] = lr
    prompt["6"]["inputs"]["validation_every"] = VALIDATE
    return prompt


def runs_folder(server) -> Path:
    return server.base_dir / "output" / "klein_lora_lab" / "runs"


def run_state(folder: Path) -> dict[str, Any]:
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step

    if not (folder / "run.json").is_file():
        return {"started": False}
    run = RunFolder.open(folder)
    last = run.latest_checkpoint()
    return {"started": True, "last": checkpoint_step(last) if last else 0, "status": run.meta.get("status")}


@pytest.fixture(scope="module")
def sweep_case(comfy_server, tiny_spec) -> dict[str, Any]:
    """Queue the sweep (it is cancelled right after run 2's first checkpoint), record the state, queue it again,
    then train runs 1, 2 and 3 alone with the Train node, a websocket client listening all along (the training
    panel's events). Times are printed (never asserted)."""
    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    album = make_album(comfy_server.base_dir / "input" / "album_sweep", label="swept", tint=23)
    root = runs_folder(comfy_server)
    prompt = sweep_prompt(album, cond_file)
    with EventListener(comfy_server.url) as listener:
        start = time.perf_counter()
        prompt_id = comfy_server.queue_prompt(prompt)
        cancelled = comfy_server.wait_history(prompt_id, timeout_s=900)
        first_seconds = time.perf_counter() - start
        after_cancel = [run_state(root / r) for r in RUNS]
        manifest_after_cancel = json.loads((root / f"{SWEEP}.sweep.json").read_text())
        start = time.perf_counter()
        outputs = comfy_server.run_prompt(prompt, timeout_s=900)
        second_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(len(VALUES)):
            comfy_server.run_prompt(alone_prompt(album, cond_file, f"alone{i}", VALUES[i]), timeout_s=600)
        alone_seconds = (time.perf_counter() - start) / len(VALUES)
    print(
        f"\nsweep: first queue (cancelled in run 2) {first_seconds:.1f} s, second queue {second_seconds:.1f} s; "
        f"one run alone {alone_seconds:.1f} s ({STEPS} steps, tiny model, CPU)"
    )
    return {
        "cancelled": cancelled,
        "after_cancel": after_cancel,
        "manifest_after_cancel": manifest_after_cancel,
        "outputs": outputs,
        "root": root,
        "cond_file": cond_file,
        "album": album,
        "panel_events": listener.of_type("klein_lab.train."),
    }


def test_cancel_keeps_finished_runs_and_the_current_one(sweep_case) -> None:
    """Cancel during run 2 ends the prompt as interrupted; run 1 is finished, run 2 keeps its checkpoint at the step
    the Cancel came (nothing past it), run 3 never started, and the manifest says so."""
    status = sweep_case["cancelled"]["status"]
    assert status["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in status["messages"])
    first, second, third = sweep_case["after_cancel"]
    assert first == {"started": True, "last": STEPS, "status": "finished"}
    assert second == {"started": True, "last": CANCEL_AT, "status": "interrupted"}
    assert third == {"started": False}
    manifest = sweep_case["manifest_after_cancel"]
    assert manifest["knob"] == "learning_rate" and manifest["values"] == list(VALUES)
    assert [r["name"] for r in manifest["runs"]] == RUNS and [r["label"] for r in manifest["runs"]] == LABELS
    assert [r["status"] for r in manifest["runs"]] == ["finished", "partial", "missing"]


def test_panel_events_say_which_run_of_the_sweep_trains(sweep_case) -> None:
    """Every training panel event of a sweep's run names the Sweep node and says which run of the sweep it is
    ("run 2 of 3: learning_rate 0.002": knob and value); the runs' step events arrive in the sweep's order and
    cover every step (run 2: step 1 before the Cancel, the rest after queueing again); a run the Train node trains
    alone carries no sweep."""
    by_run: dict[str, list[dict]] = {}
    for _kind, data in sweep_case["panel_events"]:
        if data.get("phase") == "encoding":  # the Encode node's progress: before any run, for no run
            continue
        by_run.setdefault(data["run"], []).append(data)
    assert list(by_run) == [*RUNS, "alone0", "alone1", "alone2"]
    for i, name in enumerate(RUNS):
        value = f"{VALUES[i]:g}"
        expected = {
            "name": SWEEP,
            "index": i,
            "total": 3,
            "knob": "learning_rate",
            "value": value,
            "text": f"run {i + 1} of 3: learning_rate {value}",
        }
        assert all(d["sweep"] == expected and d["node"] == "6" for d in by_run[name]), name
        steps = sorted({p[0] for d in by_run[name] if "points" in d for p in d["points"]})
        assert steps == list(range(1, STEPS + 1)), name
    assert all("sweep" not in d for i in range(3) for d in by_run[f"alone{i}"])


def test_queueing_again_completes_the_sweep(sweep_case) -> None:
    """The second queue resumes run 2 and trains run 3 (run 1 is not trained again); every run ends at the last
    step with one metrics line per step; the node names the last run's final checkpoint."""
    root = sweep_case["root"]
    manifest = json.loads((root / f"{SWEEP}.sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["finished"] * 3
    for name in RUNS:
        records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), name
    text = sweep_case["outputs"]["6"]["text"][0]
    assert f"Sweep '{SWEEP}' finished: 3 runs of learning_rate" in text and "2 trained now" in text


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_run_equals_the_run_trained_alone(sweep_case, index: int) -> None:
    """Run 1 (the first on the freshly loaded model), run 2 (cancelled and resumed inside the sweep) and run 3
    (trained after another run on the same loaded model) have the same settings and bit-identical checkpoint
    tensors, at every checkpoint, as the Train node trained alone with the same widgets and learning rate; their
    losses match step for step."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder

    swept = RunFolder.open(sweep_case["root"] / RUNS[index])
    alone = RunFolder.open(sweep_case["root"] / f"alone{index}")
    assert swept.settings == alone.settings and swept.settings.learning_rate == VALUES[index]
    assert [p.name for p in swept.checkpoints()] == [p.name for p in alone.checkpoints()]
    for a, b in zip(swept.checkpoints(), alone.checkpoints(), strict=True):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys()
        assert all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta), a.name
    assert [r["loss"] for r in swept.read_metrics()] == [r["loss"] for r in alone.read_metrics()]


def scrub_prompt(scales: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "3": {"class_type": "KleinLabTestCLIPLoader", "inputs": {"context_dim": 64}},
        "9": {"class_type": "KleinLabLoadSweep", "inputs": {"sweep_name": SWEEP}},
        "10": {
            "class_type": "KleinLabScrubRun",
            "inputs": {
                "model": ["1", 0],
                "vae": ["2", 0],
                "run": "(LoRA files below)",
                "lora_files": "",
                "checkpoints": f"{STEPS // 2},{STEPS}",
                "scales": scales,
                "clip": ["3", 0],
                "prompts": "a TOK cat",
                "seed": 5,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "width": SIZE,
                "height": SIZE,
                "block_preset": "all",
                "sweep": ["9", 0],
            },
        },
    }


@pytest.fixture(scope="module")
def scrubbed(sweep_case, comfy_server) -> dict[str, Any]:
    outputs = comfy_server.run_prompt(scrub_prompt("0,1"), timeout_s=600)
    meta = outputs["10"]["klein_scrub"][0]

    def image(frame: dict) -> np.ndarray:
        ref = frame["image"]
        data = comfy_server.view_file(ref["filename"], ref["subfolder"], ref["type"])
        return np.asarray(Image.open(BytesIO(data)).convert("RGB"), dtype=np.float32)

    return {"meta": meta, "images": [image(f) for f in meta["frames"]]}


def test_scrub_of_the_sweep_has_a_run_axis_in_stable_order(scrubbed) -> None:
    """The scrub of the sweep renders runs × checkpoints × scales in the order run → step → scale, labels start
    with knob=value and name the real step; the axes are run (labels), step, scale, prompt."""
    meta = scrubbed["meta"]
    axes = {a["name"]: a["values"] for a in meta["axes"]}
    assert [a["name"] for a in meta["axes"]] == ["run", "step", "scale", "prompt"]
    assert axes["run"] == LABELS and axes["step"] == [STEPS // 2, STEPS] and axes["scale"] == [0, 1]
    expected = [
        (r, c, s, f"{LABELS[r]} · step {step} · scale {scale:g}")
        for r in range(3)
        for c, step in enumerate(axes["step"])
        for s, scale in enumerate(axes["scale"])
    ]
    assert [(*f["coords"][:3], f["label"]) for f in meta["frames"]] == expected
    assert [f["index"] for f in meta["frames"]] == list(range(12))


def test_scrub_of_the_sweep_frames_follow_the_runs(scrubbed) -> None:
    """Scale 0 is the base model in every run (identical frames); at scale 1 the three learning rates give three
    different frames at the last checkpoint."""
    images, frames = scrubbed["images"], scrubbed["meta"]["frames"]
    at = {tuple(f["coords"][:3]): images[i] for i, f in enumerate(frames)}
    assert all(np.array_equal(at[(0, 1, 0)], at[(r, c, 0)]) for r in range(3) for c in range(2))
    last = [at[(r, 1, 1)] for r in range(3)]
    assert all(np.abs(last[a] - last[b]).mean() > 0 for a in range(3) for b in range(a + 1, 3))


def test_sweep_curves_chart_and_reading(sweep_case, comfy_server) -> None:
    """Klein Sweep Curves on the loaded sweep: one chart of the requested size, and a reading with one line per run
    (knob=value first, from the validation loss: the runs were not diagnosed), the lowest validation loss of the
    sweep, and which runs still lack the prompt tests."""
    prompt = {
        "9": {"class_type": "KleinLabLoadSweep", "inputs": {"sweep_name": SWEEP}},
        "11": {
            "class_type": "KleinLabSweepCurves",
            "inputs": {"sweep": ["9", 0], "width": 640, "height": 320, "smoothing": 0.5},
        },
    }
    out = comfy_server.run_prompt(prompt, timeout_s=300)["11"]
    lines = out["text"][0].splitlines()
    assert len(lines) == 5
    for label, line in zip(LABELS, lines, strict=False):
        assert line.startswith(f"{label}: validation loss "), line
    assert lines[3].startswith("lowest validation loss of the sweep over learning_rate: learning_rate=")
    assert lines[4].startswith(f"no diagnostics yet for {', '.join(LABELS)}")
    image = out["images"][0]
    data = comfy_server.view_file(image["filename"], image["subfolder"], image["type"])
    assert Image.open(BytesIO(data)).size == (640, 320)
    print("\n" + "\n".join(lines))


def last_checkpoint(server, run: str) -> str:
    """The run's last checkpoint as the loras list names it (the panel's history route reads it)."""
    query = urllib.parse.urlencode({"run": run})
    return server.get_json(f"/klein_lab/train/history?{query}")["checkpoints"][-1]["lora"]


def test_mixer_grid_mixes_checkpoints_of_two_runs(sweep_case, comfy_server) -> None:
    """The mixer grid takes the last checkpoints of two runs of the sweep as LoRA A and LoRA B (the runs are in the
    loras list): four cells in row order, scale 0 × 0 is the base, and each run alone, both together and the base
    are four different pictures."""
    lora_a, lora_b = last_checkpoint(comfy_server, RUNS[0]), last_checkpoint(comfy_server, RUNS[2])
    assert lora_a.endswith(f"{RUNS[0]}/checkpoints/step_{STEPS:06d}.safetensors")
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "3": {"class_type": "KleinLabTestCLIPLoader", "inputs": {"context_dim": 64}},
        "14": {
            "class_type": "KleinLabMixerGrid",
            "inputs": {
                "model": ["1", 0],
                "vae": ["2", 0],
                "clip": ["3", 0],
                "lora_a": lora_a,
                "scales_a": "0,1",
                "preset_a": "all",
                "lora_b": lora_b,
                "scales_b": "0,1",
                "preset_b": "all",
                "prompt": "a TOK cat",
                "seed": 5,
                "steps": 2,
                "cfg": 1.0,
                "width": SIZE,
                "height": SIZE,
            },
        },
    }
    meta = comfy_server.run_prompt(with_defaults(comfy_server, prompt), timeout_s=600)["14"]["klein_scrub"][0]
    assert [f["coords"] for f in meta["frames"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    images = []
    for frame in meta["frames"]:
        ref = frame["image"]
        data = comfy_server.view_file(ref["filename"], ref["subfolder"], ref["type"])
        images.append(np.asarray(Image.open(BytesIO(data)).convert("RGB"), dtype=np.float32))
    assert all(np.abs(images[a] - images[b]).mean() > 0 for a in range(4) for b in range(a + 1, 4))


def test_diagnose_every_run_of_the_sweep_and_read_it(sweep_case, comfy_server) -> None:
    """Klein Diagnose Run with the sweep connected diagnoses every run (a diagnostics.json in each run folder with
    one record per chosen checkpoint × scale), reports run after run under its label and ends with the sweep read
    from those diagnostics (no run 'without diagnostics' any more); one sweet-spot chart per run. Sweep Curves
    queued after it reads the same diagnostics. (Runs after the curves test, which reads the sweep undiagnosed.)"""
    from klein_lora_lab.trainer_core.analysis.sweet_spot import read_diagnostics

    prompt = {
        k: v for k, v in train_prompt(sweep_case["album"], sweep_case["cond_file"], "x", STEPS).items() if k in "12345"
    }
    prompt["13"] = {"class_type": "KleinLabTestCLIPLoader", "inputs": {"context_dim": 64}}
    prompt["9"] = {"class_type": "KleinLabLoadSweep", "inputs": {"sweep_name": SWEEP}}
    prompt["12"] = {
        "class_type": "KleinLabDiagnoseRun",
        "inputs": {
            "model": ["1", 0],
            "clip": ["13", 0],
            "vae": ["2", 0],
            "encoded_dataset": ["5", 0],
            "run": RUNS[0],
            "checkpoints": f"{STEPS // 2},{STEPS}",
            "scales": "1",
            "seed": 0,
            "steps": 2,
            "cfg": 1.0,
            "width": SIZE,
            "height": SIZE,
            "sweep": ["9", 0],
        },
    }
    prompt["11"] = {
        "class_type": "KleinLabSweepCurves",
        "inputs": {"sweep": ["9", 0], "width": 640, "height": 320, "smoothing": 0.5, "after": ["12", 0]},
    }
    outputs = comfy_server.run_prompt(with_defaults(comfy_server, prompt), timeout_s=900)
    report = outputs["12"]["text"][0]
    print("\n" + report)
    heads = [line for line in report.splitlines() if line.startswith("== ")]
    assert heads == [
        *(f"== {label} ({run}) ==" for label, run in zip(LABELS, RUNS, strict=True)),
        f"== sweep '{SWEEP}' over learning_rate ==",
    ]
    reading = report.split(heads[-1], 1)[1].strip().splitlines()
    for label, line in zip(LABELS, reading, strict=False):
        assert line.startswith(f"{label}: "), line
    assert "no diagnostics yet" not in report
    assert len(outputs["12"]["images"]) == 3
    for run in RUNS:
        records = read_diagnostics(sweep_case["root"] / run)["records"]
        assert [(r["step"], r["scale"]) for r in records] == [(STEPS // 2, 1.0), (STEPS, 1.0)], run
    assert outputs["11"]["text"][0].splitlines()[:3] == reading[:3]
