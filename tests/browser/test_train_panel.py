"""The training panel (js/train_panel.js) in the real ComfyUI frontend, classic canvas and Vue nodes.

One browser run (tests/browser/train_panel.mjs): the style workflow with the tiny model, the random VAE and the fake
CLIP loader swapped in is queued from the page in each renderer. The chart's point count grows while the run goes,
the gallery fills at each validation with step and prompt labels, hovering the chart reads the values, an image
opens large and two steps compare A/B, a page reload mid-run restores the history from the run folder, Stop & keep
ends the prompt as a success with a kept checkpoint, and Resume runs to the new end. A planted run whose clinic
records collapse onto the album shows the sweet-spot mark at its step; a failing prompt shows the pack's message on
the node. Screenshots go to test-artifacts/browser/ (with KLEIN_LAB_UPDATE_DOCS_IMAGES=1 also to docs/images/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from harness.browser import ARTIFACTS, run_driver
from harness.comfy_env import PACK_ROOT
from harness.server import TINY_MODEL_NAME, VAE_NAME
from harness.workflow_prompt import make_album

MODES = ("classic", "vue")
WORKFLOW = PACK_ROOT / "workflows" / "Klein 01 - Train a style LoRA.json"
PLANTED = "panel_planted"
PLANTED_STEPS = (1, 2, 3, 4, 5, 6)
COLLAPSE_AT = 4
BENCH_STEPS = 30
RUN_STEPS = 400  # far more than the test waits for: the run is stopped from the panel
PROMPTS = (
    "a photo of [trigger]\na photo of [trigger] riding a bicycle\na photo of a bicycle leaning against a brick wall"
)
DOCS_IMAGES = {
    "panel-classic-training.png": "train-panel.png",
    "panel-vue-sweet-spot.png": "train-panel-sweet-spot.png",
    "panel-vue-compare.png": "train-panel-compare.png",
}


def plant_run(runs: Path) -> dict[str, Any]:
    """A tiny real run (checkpoints 1..6) whose clinic.jsonl holds the constructed validations of
    tests/unit/test_live_clinic.py: the bicycle prompt collapses onto the album at step COLLAPSE_AT."""
    from harness.clinic import constructed_run
    from harness.runs import make_tiny_run
    from klein_lora_lab.trainer_core.analysis.live_clinic import append_clinic, find_mark, read_clinic

    if not (runs / PLANTED).is_dir():
        make_tiny_run(runs, PLANTED, PLANTED_STEPS)
        for record in constructed_run(COLLAPSE_AT, list(PLANTED_STEPS)):
            append_clinic(runs / PLANTED, record)
    return find_mark(read_clinic(runs / PLANTED)).to_dict()


@pytest.fixture(scope="module")
def panel(comfy_server, tmp_path_factory) -> dict[str, Any]:
    album = make_album(comfy_server.base_dir / "input" / "panel_album", label="panel", tint=51)
    runs = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    mark = plant_run(runs)
    widgets = {
        "UNETLoader": {"unet_name": TINY_MODEL_NAME},
        "VAELoader": {"vae_name": VAE_NAME},
        "KleinLabDatasetFolder": {"resolution": 32, "trigger": "TOK"},
        "KleinLabEncodeDataset": {"validation_prompts": PROMPTS},
        "KleinLabTrainLora": {
            "steps": RUN_STEPS,
            "rank": 4,
            "checkpoint_every": 2,
            "sample_every": 2,
            "sample_steps": 2,
            "sample_cfg": 1.0,
            "learning_rate": 1e-3,
        },
    }
    config = {
        "workflow": json.loads(WORKFLOW.read_text()),
        "album": str(album),
        "runs": {mode: f"panel_{mode}" for mode in MODES},
        "planted": PLANTED,
        "widgets": widgets,
        "timeoutMs": 900_000,
        "bench": {"run": "panel_bench_page", "steps": BENCH_STEPS},
    }
    path = tmp_path_factory.mktemp("panel") / "config.json"
    path.write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLEIN_LAB_PANEL_CONFIG", str(path))
        result = run_driver("train_panel.mjs", comfy_server.url, timeout_s=3000)
    if os.environ.get("KLEIN_LAB_UPDATE_DOCS_IMAGES") == "1":
        from PIL import Image

        docs = PACK_ROOT / "docs" / "images"
        for src, dst in DOCS_IMAGES.items():
            with Image.open(ARTIFACTS / src) as image:
                image.convert("RGB").quantize(colors=128).save(docs / dst, optimize=True)
    (ARTIFACTS / "panel-result.json").write_text(json.dumps(result, indent=2))
    return {"result": result, "mark": mark, "history": comfy_server.get_json("/history"), "runs": runs}


def test_extension_registered_once_without_errors(panel) -> None:
    """The panel and the error extensions register once; nothing the page logs as an error mentions the pack. The
    frontend's probes of the loaders' download links (the Klein files' URLs) are refused by the page's content
    security policy here; those are not the pack's."""
    result = panel["result"]
    assert result["extensions"].count("KleinLoraLab.trainPanel") == 1
    assert result["extensions"].count("KleinLoraLab.nodeErrors") == 1
    errors = [e for e in result["pageErrors"] if "Content Security Policy" not in e]
    assert [e for e in errors if "klein" in e.lower() or "panel" in e.lower()] == []


@pytest.mark.parametrize("mode", MODES)
def test_chart_grows_and_gallery_fills_with_labels(panel, mode: str) -> None:
    """Queued from the page, the panel lives in the node (inside the Vue node with Vue nodes on), its chart's point
    count grows while the run goes, and the gallery holds the base row (step 0) and the validations, newest
    first, every image labelled with its step and prompt and loaded through /view."""
    r = panel["result"]["modes"][mode]
    assert r["early"]["inVueNode"] is (mode == "vue")
    assert r["early"]["points"] >= 2 and r["later"]["points"] > r["early"]["points"]
    assert r["later"]["chartPoints"] == r["later"]["points"]
    rows = r["later"]["rows"]
    assert rows == sorted(rows, reverse=True) and rows[-1] == 0 and all(s % 2 == 0 for s in rows)
    labels = r["later"]["labels"]
    assert labels[:3] == [
        f"step {rows[0]} · a photo of TOK",
        f"step {rows[0]} · a photo of TOK riding a bicycle",
        f"step {rows[0]} · a photo of a bicycle leaning against a brick wall",
    ]
    assert "step 0 (base) · a photo of TOK" in labels
    assert r["later"]["imgs"] and all(i["ok"] and "/view?" in i["src"] for i in r["later"]["imgs"])
    assert r["later"]["clinicPoints"] >= 1  # the live clinic measured the validations
    assert "step" in r["later"]["statusText"] and "phase" in r["later"]["statusText"]
    assert "peak VRAM" in r["later"]["statusText"]


@pytest.mark.parametrize("mode", MODES)
def test_hover_scale_enlarge_and_compare(panel, mode: str) -> None:
    """Hovering the chart reads a step and its loss; the scale switches to log; a click enlarges an image with its
    label; A on the newest step and B on the base show both side by side."""
    r = panel["result"]["modes"][mode]
    assert r["hover"].startswith("step ") and "loss" in r["hover"] and "smoothed" in r["hover"]
    assert r["logScale"] == "log"
    assert len(r["enlarged"]) == 1 and r["enlarged"][0].startswith("step ")
    newest = r["later"]["rows"][0]
    assert len(r["compare"]) == 2
    assert r["compare"][0].startswith("A: step ") and r["compare"][1] == "B: step 0 · a photo of TOK"
    assert int(r["compare"][0].split()[2]) >= newest


@pytest.mark.parametrize("mode", MODES)
def test_reload_mid_run_restores_the_history(panel, mode: str) -> None:
    """After a real page reload mid-run the panel shows at least the points and every gallery row it had, read
    from the run folder, and keeps following the running run."""
    r = panel["result"]["modes"][mode]
    before, after = r["beforeReload"], r["afterReload"]
    assert r["persisted"], "no stored workflow held the Train node as it was before the reload"
    assert after["run"] == f"panel_{mode}"
    assert after["points"] >= before["points"] > 0
    assert set(before["rows"]) <= set(after["rows"])
    assert after["status"] == "running" and not after["stopDisabled"]


@pytest.mark.parametrize("mode", MODES)
def test_stop_and_keep_then_resume(panel, mode: str) -> None:
    """Stop & keep ends the run with a kept checkpoint and a prompt that is not failed; Resume (resume on, queued)
    runs to the new end; the history holds one success per prompt and no error."""
    r = panel["result"]["modes"][mode]
    stopped = r["stopped"]
    step = stopped["points"]
    assert "Stopped & kept at step" in stopped["message"] and f"panel_{mode}/checkpoints/step_" in stopped["message"]
    assert not stopped["resumeHidden"] and stopped["stopDisabled"]
    run = panel["runs"] / f"panel_{mode}"
    assert (run / "checkpoints" / f"step_{step:06d}.safetensors").is_file()
    finished = r["finished"]
    assert finished["widgets"]["resume"] is True
    assert f"Finished {step + 2} steps" in finished["message"]
    ours = [
        e
        for e in panel["history"].values()
        if any(f"panel_{mode}" in json.dumps(n["inputs"]) for n in e["prompt"][2].values())
    ]
    statuses = [e["status"]["status_str"] for e in ours]
    assert statuses == ["success", "success"], statuses


@pytest.mark.parametrize("mode", MODES)
def test_planted_collapse_shows_the_mark_at_its_step(panel, mode: str) -> None:
    """A run whose validations collapse onto the album at step 4 shows the sweet-spot mark at step 4, naming the
    memorisation rule and the checkpoint the Sweet Spot node picks from the same records."""
    obs = panel["result"]["planted"][mode]
    mark = panel["mark"]
    assert mark["step"] == COLLAPSE_AT and mark["rule"] == "memorised"
    assert obs["mark"]["step"] == str(COLLAPSE_AT)
    assert "bicycle prompts" in obs["mark"]["text"]
    assert f"{PLANTED}/checkpoints/step_{mark['keep_step']:06d}.safetensors" in obs["mark"]["text"]
    assert obs["clinicPoints"] == len(PLANTED_STEPS) and obs["points"] == len(PLANTED_STEPS)


def test_sweep_node_panel_says_which_run_trains(panel) -> None:
    """The Sweep node carries the training panel; with no sweep training its sweep line is hidden, and the step
    events of a sweep's run make it say which run of the sweep trains, with the knob and value, following the
    sweep from run 2 to run 3."""
    r = panel["result"]["sweepPanel"]
    assert r["hasPanel"] and r["before"]["hidden"] is True
    assert r["second"] == {"text": "run 2 of 3: learning_rate 5e-05", "hidden": False, "run": "lr-learning_rate-5e-05"}
    assert r["third"] == {"text": "run 3 of 3: learning_rate 0.0002", "hidden": False, "run": "lr-learning_rate-0.0002"}


def test_new_node_shows_the_presets_values(panel) -> None:
    """A new Train node shows the style preset's rank/alpha/learning rate/steps instead of zeros; picking the
    character preset moves them, except the rank the artist typed."""
    p = panel["result"]["presets"]
    assert p["fresh"] == {"rank": 16, "alpha": 16.0, "learning_rate": 3e-4, "steps": 650}
    assert p["switched"] == {"rank": 8, "alpha": 32.0, "learning_rate": 2e-4, "steps": 1000}


@pytest.mark.parametrize("mode", MODES)
def test_pack_error_shows_on_the_node(panel, mode: str) -> None:
    """A prompt failing inside a pack node (a run name with '..') shows the pack's own message, which names the value
    and the fix, on the failing node itself, and as a toast's first line."""
    e = panel["result"]["errors"][mode]
    assert e["last"]["type"] == "KleinLabTrainLora"
    assert "run name" in e["last"]["message"] and "../escape" in e["last"]["message"]
    assert e["onNode"] and "Failed:" in e["onNode"] and "run name" in e["onNode"]
    assert e["inVue"] is (mode == "vue")
    assert any("run name" in t for t in e["toasts"]), e["toasts"]


def _rate(message: str) -> float:
    """it/s from the node's closing text 'Finished N steps (X it/s, ...)'."""
    return float(message.split("(", 1)[1].split(" it/s", 1)[0])


def test_figures_page_connected_vs_not_and_cost_per_event(panel, comfy_server) -> None:
    """Prints s/step of the same run queued from the page (the panel following it) and through the API with no page
    open, and the page's cost per step event; the panel's work per event stays far below a training step."""
    page = panel["result"]["bench"]
    assert page["points"] == BENCH_STEPS and f"Finished {BENCH_STEPS} steps" in page["message"]
    entry = next(
        e
        for e in panel["history"].values()
        if any(n["inputs"].get("run_name") == "panel_bench_page" for n in e["prompt"][2].values())
    )
    prompt = json.loads(json.dumps(entry["prompt"][2]))
    for node in prompt.values():
        if node["class_type"] == "KleinLabTrainLora":
            node["inputs"]["run_name"] = "panel_bench_api"
    outputs = comfy_server.run_prompt(prompt, timeout_s=900)
    train_id = next(k for k, n in prompt.items() if n["class_type"] == "KleinLabTrainLora")
    api_message = outputs[train_id]["text"][0]
    cost = panel["result"]["eventCost"]
    figures = {
        "steps": BENCH_STEPS,
        "s_per_step_page_connected": round(1 / _rate(page["message"]), 4),
        "s_per_step_no_page": round(1 / _rate(api_message), 4),
        "page_handler_ms_per_step_event": round(cost["handlerMsPerEvent"], 3),
        "page_chart_redraw_ms": round(cost["drawMsPerFrame"], 3),
        "points_held_during_event_cost": cost["pointsHeld"],
    }
    (ARTIFACTS / "panel-figures.json").write_text(json.dumps(figures, indent=2))
    print("\n" + json.dumps(figures, indent=2))
    assert cost["pointsHeld"] == 2000 + cost["events"]
    # At most 10 events a second reach the page: even all of them cost a small share of each second.
    assert 10 * (cost["handlerMsPerEvent"] + cost["drawMsPerFrame"]) < 1000
