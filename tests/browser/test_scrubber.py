"""The scrubber widget (js/scrubber.js) in the real ComfyUI frontend, classic canvas and Vue nodes.

Two parts, in one browser run (tests/browser/scrub.mjs):
1. A result is delivered to a KleinLabScrubRun node as the server sends it (`executed` with `klein_scrub`), with
   labelled frame images written into the server's output folder: the driver drags the sliders with the mouse,
   walks with the keyboard, clicks a thumbnail, sets A/B, saves and reloads the workflow, times frame display,
   checks a KleinLabMixerGrid node and loads a 400-frame result.
2. The example workflow "Klein 03 - Scrub the checkpoints of a run" is loaded in the page, its loaders swapped for
   the tiny model, the random VAE and the fake CLIP loader, pointed at a tiny 3-checkpoint run, queued like the
   Run button, and the widget driven on the rendered frames in both renderers and across a page reload.
The driver prints what the widget showed; the tests compare that with the metas. Screenshots and the measured
figures (scrub-figures.json) go to test-artifacts/browser/; with KLEIN_LAB_UPDATE_DOCS_IMAGES=1 a few widget
screenshots are also copied to docs/images/.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from harness.browser import ARTIFACTS, run_driver
from harness.comfy_env import PACK_ROOT
from harness.server import TINY_MODEL_NAME, VAE_NAME

EXTENSION = "KleinLoraLab.scrubber"
MODES = ("classic", "vue")
SUBFOLDER = "klein_lora_lab/scrub/browser_test"
LARGE_STEPS, LARGE_SCALES = 20, 20  # 400 frames
MAX_IMGS = 40  # main + B image and the thumbs near the visible part of the strip; far below 400
WORKFLOW = PACK_ROOT / "workflows" / "Klein 03 - Scrub the checkpoints of a run.json"
RUN_NAME = "scrub_browser"
RUN_STEPS = (1, 2, 3)
FRAME_SIZE = 64  # a 4x4 latent, as the tiny run was trained
WORKFLOW_TIMEOUT_MS = 240_000
DOCS_IMAGES = {  # test artifact -> docs/images name (the workflow one only when the workflow ran)
    "scrub-vue-keys-widget.png": "scrubber.png",
    "scrub-classic-ab-side-widget.png": "scrubber-ab-side.png",
    "scrub-vue-ab-wipe-widget.png": "scrubber-ab-wipe.png",
    "scrub-workflow-vue-moved-widget.png": "scrubber-tiny-run.png",
}


def _write_frames(output_dir: Path, key: str, frames: list, axes: list[dict], size: int) -> dict[str, Any]:
    """Draw one distinct PNG (and JPEG thumb) per frame, labelled, under output/<SUBFOLDER>/<key>; return the meta."""
    from PIL import Image, ImageDraw

    subfolder = f"{SUBFOLDER}/{key}"
    folder = output_dir / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for frame in frames:
        hue = (frame.index * 47) % 256
        image = Image.new("RGB", (size, size), (hue, 255 - hue, (frame.index * 13) % 256))
        ImageDraw.Draw(image).text((6, 6), frame.label, fill="white")
        image.save(folder / f"frame_{frame.index:04d}.png")
        image.resize((48, 48)).save(folder / f"thumb_{frame.index:04d}.jpg", quality=80)
        ref = {"subfolder": subfolder, "type": "output"}
        records.append(
            {
                "index": frame.index,
                "coords": list(frame.coords),
                "label": frame.label,
                "image": {"filename": f"frame_{frame.index:04d}.png", **ref},
                "thumb": {"filename": f"thumb_{frame.index:04d}.jpg", **ref},
            }
        )
    return {
        "version": 1,
        "node": "KleinLabScrubRun",
        "axes": axes,
        "frames": records,
        "grid": {"filename": "frame_0000.png", "subfolder": subfolder, "type": "output"},
    }


def scrub_meta(output_dir: Path, key: str, steps: list[int], scales: list[float], size: int) -> dict[str, Any]:
    """A scrub result in the node's frame order and labels (trainer_core.scrub), with real files behind it.

    The node renders at most scrub.MAX_FRAMES frames; the widget must cope with more (a large mixer grid, a
    future limit), so the plan is built here with the node's own label function and order, without the cap."""
    from klein_lora_lab.trainer_core.analysis.scrub import Checkpoint, Frame, frame_label, scrub_axes

    checkpoints = [Checkpoint(f"run/step_{s:06d}.safetensors", s) for s in steps]
    prompts = ["a TOK cat"]
    frames = []
    for c, ckpt in enumerate(checkpoints):  # checkpoint-major, then scale (frame_plan's order)
        for s, scale in enumerate(scales):
            label = frame_label(ckpt, scale, 0, len(prompts))
            frames.append(Frame(len(frames), (c, s, 0), ckpt.lora, ckpt.step, scale, prompts[0], 0, label))
    return _write_frames(output_dir, key, frames, scrub_axes(checkpoints, scales, prompts), size)


def workflow_case(comfy_server) -> tuple[dict[str, Any] | None, str]:
    """The example workflow's scenario (a tiny 3-checkpoint run in the server's runs folder, the widgets to set),
    or None and why not when the workflow or the node is not there."""
    if not WORKFLOW.is_file():
        return None, f"{WORKFLOW.relative_to(PACK_ROOT)} does not exist"
    if "KleinLabScrubRun" not in comfy_server.object_info():
        return None, "the server has no KleinLabScrubRun node"
    from harness.runs import make_tiny_run

    runs = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    if not (runs / RUN_NAME).is_dir():
        make_tiny_run(runs, RUN_NAME, RUN_STEPS)
    small = {"width": FRAME_SIZE, "height": FRAME_SIZE, "steps": 3}
    widgets = {
        "UNETLoader": {"unet_name": TINY_MODEL_NAME},
        "VAELoader": {"vae_name": VAE_NAME},
        "KleinLabScrubRun": {
            "run": RUN_NAME,
            "checkpoints": "all",
            "scales": "0,1,2",
            "prompts": "a TOK cat",
            "cfg": 2.0,
            **small,
        },
    }
    spec = {"workflow": json.loads(WORKFLOW.read_text()), "widgets": widgets, "small": small}
    return {**spec, "timeoutMs": WORKFLOW_TIMEOUT_MS}, ""


def mixer_meta(output_dir: Path, scales: list[float], size: int) -> dict[str, Any]:
    """A mixer-grid result (scale of LoRA A x scale of LoRA B) in the node's order and labels, with files."""
    from klein_lora_lab.trainer_core.analysis.scrub import mixer_plan

    frames = mixer_plan("tok", "tokstyle", scales, scales)
    axes = [{"name": "scale_a", "values": scales}, {"name": "scale_b", "values": scales}]
    meta = _write_frames(output_dir, "mixer", frames, axes, size)
    return {**meta, "node": "KleinLabMixerGrid"}


@pytest.fixture(scope="module")
def scrub_case(comfy_server, tmp_path_factory) -> dict[str, Any]:
    output = comfy_server.base_dir / "output"
    small = scrub_meta(output, "small", [300, 600, 900], [0.0, 1.0, 2.0], size=256)
    large_steps = [100 * (i + 1) for i in range(LARGE_STEPS)]
    large_scales = [round(0.2 * i, 1) for i in range(LARGE_SCALES)]
    large = scrub_meta(output, "large", large_steps, large_scales, size=96)
    mixer = mixer_meta(output, [0.0, 0.5, 1.0], size=128)
    workflow, why_not = workflow_case(comfy_server)
    config = tmp_path_factory.mktemp("scrub") / "config.json"
    config.write_text(json.dumps({"small": small, "large": large, "mixer": mixer, "workflow": workflow}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLEIN_LAB_SCRUB_CONFIG", str(config))
        result = run_driver("scrub.mjs", comfy_server.url, timeout_s=400)
    (ARTIFACTS / "scrub-result.json").write_text(json.dumps(result))  # what the driver saw, for a failure's report
    figures = _figures(result)
    (ARTIFACTS / "scrub-figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    if os.environ.get("KLEIN_LAB_UPDATE_DOCS_IMAGES") == "1":
        docs = PACK_ROOT / "docs" / "images"
        docs.mkdir(parents=True, exist_ok=True)
        for src, dst in DOCS_IMAGES.items():
            if not src.startswith("scrub-workflow") or result.get("workflow", {}).get("meta"):
                small_png(ARTIFACTS / src, docs / dst)
    history = comfy_server.get_json("/history") if workflow else {}
    return {
        "small": small,
        "large": large,
        "mixer": mixer,
        "result": result,
        "why_no_workflow": why_not,
        "history": history,
    }


def small_png(src: Path, dst: Path) -> None:
    """Copy a screenshot as a 128-colour PNG (docs images stay small in the repository)."""
    from PIL import Image

    with Image.open(src) as image:
        image.convert("RGB").quantize(colors=128).save(dst, optimize=True)


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for mode, r in result["modes"].items():
        large = r["large"]
        out[mode] = {
            "show_frame_ms_first_median": statistics.median(r["showMs"]["first"]),
            "show_frame_ms_cached_median": statistics.median(r["showMs"]["cached"]),
            "show_frame_ms_all": r["showMs"],
            "large_frames": large["frames"],
            "large_deliver_ms": round(large["deliverMs"], 1),
            "large_max_img_elements": large["maxImgs"],
            "large_max_frame_gap_ms": round(large["maxFrameGapMs"], 1),
            "large_long_tasks_ms": [round(t) for t in large["longTasksMs"]],
        }
    if result.get("workflow", {}).get("meta"):
        w = result["workflow"]
        out["workflow"] = {
            "queue_to_widget_ms": w["runMs"],
            "frame_size_px": FRAME_SIZE,
            "workflow_stored_after_ms": w["persistMs"],  # last widget move -> draft in localStorage
            "reload_to_restored_widget_ms": w["reloadRestoreMs"],
        }
    return out


def frame_of(meta: dict[str, Any], obs: dict[str, Any], expected: int) -> None:
    """The widget shows frame `expected`: its index, its label, its image (loaded), and the node remembers it."""
    frame = meta["frames"][expected]
    assert obs["frame"] == expected, (obs["frame"], expected)
    assert obs["label"] == frame["label"]
    assert obs["count"] == f"{expected + 1} / {len(meta['frames'])}"
    assert f"filename={frame['image']['filename']}" in obs["src"]
    assert "subfolder=" + frame["image"]["subfolder"].replace("/", "%2F") in obs["src"]
    assert obs["loaded"], f"image of frame {expected} did not load: {obs['src']}"
    assert obs["props"]["frame"] == expected


def test_extension_registered_once_without_errors(scrub_case) -> None:
    """The frontend knows both grid nodes from the server, the scrubber extension registers exactly once, and
    nothing the page logs as an error mentions the pack. The frontend's probes of the loaders' download links
    (the Klein files' URLs) are refused by the page's content security policy here; those are not the pack's."""
    result = scrub_case["result"]
    assert result["nodeTypes"] == ["KleinLabScrubRun", "KleinLabMixerGrid"]
    assert result["extensions"].count(EXTENSION) == 1
    errors = [e for e in result["pageErrors"] if "Content Security Policy" not in e]
    assert [e for e in errors if "klein" in e.lower() or "scrub" in e.lower()] == []


@pytest.mark.parametrize("mode", MODES)
def test_widget_lives_in_the_renderer(scrub_case, mode: str) -> None:
    """The widget sits inside the Vue node's DOM with Vue nodes on, and in the canvas overlay otherwise; before a
    result it shows no frame; the delivered result shows frame 0 with its label and image."""
    r = scrub_case["result"]["modes"][mode]
    assert r["vueNodesSetting"] is (mode == "vue")
    assert r["inVueNode"] is (mode == "vue")
    assert r["empty"]["frame"] is None and r["empty"]["label"] == "" and r["empty"]["props"]["frames"] == 0
    assert r["delivered"]["how"] == "api"  # through the frontend's `executed` handling, not a direct call
    frame_of(scrub_case["small"], r["initial"], 0)
    assert r["initial"]["props"]["frames"] == 9
    for suffix in ("", "-ab-side", "-ab-wipe", "-reloaded", "-mixer", "-large"):
        assert (ARTIFACTS / f"scrub-{mode}{suffix}.png").stat().st_size > 0


@pytest.mark.parametrize("mode", MODES)
def test_mouse_drag_moves_the_frame(scrub_case, mode: str) -> None:
    """Dragging the frame slider with the mouse to its end, its start and its middle shows frames 8, 0 and 4; the
    axis sliders are one per varying axis (fastest first) and dragging `step` to its end keeps the scale."""
    r, meta = scrub_case["result"]["modes"][mode], scrub_case["small"]
    frame_of(meta, r["dragEnd"], 8)
    frame_of(meta, r["dragStart"], 0)
    frame_of(meta, r["dragMid"], 4)
    assert r["axisSliders"] == ["scale", "step"]
    frame_of(meta, r["axisDrag"], 7)  # step 900, scale 1
    assert r["axisDrag"]["axisValues"] == ["scale 1", "step 900"]


@pytest.mark.parametrize("mode", MODES)
def test_arrow_keys_walk_frames_and_axes(scrub_case, mode: str) -> None:
    """With the widget focused, Left/Right step frames, Up/Down step the checkpoint axis keeping the scale,
    Home/End jump to the first/last frame (3 checkpoints x 3 scales, scale fastest)."""
    r, meta = scrub_case["result"]["modes"][mode], scrub_case["small"]
    expected = [0, 1, 2, 5, 4, 1, 8, 5]  # Home, Right, Right, Up, Left, Down, End, Down
    assert len(r["keys"]) == len(expected)
    for obs, want in zip(r["keys"].values(), expected, strict=True):
        assert obs["focused"]
        frame_of(meta, obs, want)


@pytest.mark.parametrize("mode", MODES)
def test_thumbnail_strip(scrub_case, mode: str) -> None:
    """The strip has one thumb per frame, each showing its (small) thumbnail image while in view; clicking the
    4th shows frame 3."""
    r, meta = scrub_case["result"]["modes"][mode], scrub_case["small"]
    obs = r["thumbClick"]
    assert obs["thumbCells"] == len(meta["frames"]) == obs["thumbImgs"]
    frame_of(meta, obs, 3)


@pytest.mark.parametrize("mode", MODES)
def test_ab_compare(scrub_case, mode: str) -> None:
    """Set A on frame 1 and B on frame 7: side by side shows both images with both labels, the wipe clips B at the
    dragged position, and while comparing B follows the slider with A pinned."""
    r, meta = scrub_case["result"]["modes"][mode], scrub_case["small"]
    frames = meta["frames"]
    side = r["abSide"]
    assert side["mode"] == "side"
    assert side["aLabel"] == f"A: {frames[1]['label']}" and side["bLabel"] == f"B: {frames[7]['label']}"
    assert frames[1]["image"]["filename"] in side["src"] and frames[7]["image"]["filename"] in side["srcB"]
    assert side["props"]["ab"]["a"] == 1 and side["props"]["ab"]["b"] == 7
    wipe = r["abWipe"]
    assert wipe["mode"] == "wipe" and wipe["srcB"] and wipe["bLabel"] == side["bLabel"]
    assert wipe["clip"] == f"inset(0px 0px 0px {wipe['props']['ab']['wipe']}%)"
    assert 20 <= wipe["props"]["ab"]["wipe"] <= 40  # dragged to 30 % of the track
    follow = r["abFollow"]
    assert follow["frame"] == 6 and follow["bLabel"] == f"B: {frames[6]['label']}"
    assert follow["aLabel"] == side["aLabel"]


@pytest.mark.parametrize("mode", MODES)
def test_position_survives_save_and_reload(scrub_case, mode: str) -> None:
    """The saved workflow carries the meta, frame and A/B in the node's properties (and no value for the widget
    in widgets_values); loading it into a fresh graph shows the same frame, label, compare mode and A/B labels
    without running the node."""
    r, meta = scrub_case["result"]["modes"][mode], scrub_case["small"]
    before, after = r["beforeSave"], r["reloaded"]
    assert r["savedProps"]["klein_scrub_frame"] == before["frame"] == 6
    assert r["savedProps"]["klein_scrub_meta"] == meta
    assert r["savedProps"]["klein_scrub_ab"]["mode"] == "side"
    # The widget itself is not saved: widgets_values holds only the node's own widgets, in order.
    assert r["widgetNames"][-1] == "klein_scrub"
    assert len(r["savedWidgetValues"]) == len(r["widgetNames"]) - 1
    assert after["frame"] == before["frame"] and after["label"] == meta["frames"][6]["label"]
    assert after["props"] == before["props"] and after["loaded"]
    for key in ("mode", "aLabel", "bLabel", "src", "srcB"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("mode", MODES)
def test_mixer_grid_node_gets_the_scrubber(scrub_case, mode: str) -> None:
    """A KleinLabMixerGrid node shows its result in the same widget: Left/Right walk the scale of LoRA B,
    Up/Down the scale of LoRA A (3 x 3, scale_a-major)."""
    r, meta = scrub_case["result"]["modes"][mode]["mixer"], scrub_case["mixer"]
    frame_of(meta, r["start"], 0)
    expected = [1, 4, 7, 4]  # Right, Up, Up, Down
    for obs, want in zip(r["keys"], expected, strict=True):
        frame_of(meta, obs, want)
    assert r["keys"][1]["axisValues"] == ["scale_b 0.5", "scale_a 0.5"]


@pytest.mark.parametrize("mode", MODES)
def test_large_batch_keeps_images_bounded(scrub_case, mode: str) -> None:
    """A 400-frame result gets one light thumbnail cell per frame but only a bounded number of <img> elements
    (thumbs load only near the visible part of the strip, also while it is scrolled end to end), and the
    keyboard still moves through it afterwards."""
    large = scrub_case["result"]["modes"][mode]["large"]
    n = LARGE_STEPS * LARGE_SCALES
    assert large["frames"] == n and large["thumbCells"] == n
    assert 0 < large["maxImgs"] <= MAX_IMGS
    # 30 x ArrowUp from frame 0 steps the checkpoint axis (stride LARGE_SCALES) up to its last value.
    assert large["frame"] == (LARGE_STEPS - 1) * LARGE_SCALES
    frame_of(scrub_case["large"], large["observed"], large["frame"])


# --- stage 2: the example workflow, queued from the page on the tiny model ------------------------------------


@pytest.fixture(scope="module")
def workflow_run(scrub_case) -> dict[str, Any]:
    w = scrub_case["result"].get("workflow")
    if w is None:
        pytest.skip(f"example scrub workflow not runnable: {scrub_case['why_no_workflow']}")
    assert w["errors"] == [], w["errors"]
    assert w["meta"], f"the scrub node got no result within {WORKFLOW_TIMEOUT_MS / 1000:.0f} s"
    return w


def moved(meta: dict[str, Any], frame: int, axis: str, delta: int) -> int:
    """The frame one step along `axis` from `frame` (same other coordinates), or `frame` at the grid's edge."""
    a = [x["name"] for x in meta["axes"]].index(axis)
    coords = list(meta["frames"][frame]["coords"])
    coords[a] += delta
    match = [i for i, f in enumerate(meta["frames"]) if f["coords"] == coords]
    return match[0] if match else frame


def test_workflow_result_reaches_the_widget(scrub_case, workflow_run) -> None:
    """The example workflow, with the tiny model, VAE and fake CLIP swapped in from the page and queued like the
    Run button, renders 3 checkpoints x 3 scales; the widget holds exactly what the server recorded."""
    meta = workflow_run["meta"]
    axes = {a["name"]: a["values"] for a in meta["axes"]}
    assert axes["step"] == list(RUN_STEPS) and axes["scale"] == [0, 1, 2]
    assert len(meta["frames"]) == 9 * len(axes.get("prompt", [None]))
    node_id = workflow_run["scrubId"]
    recorded = [
        entry["outputs"][node_id]["klein_scrub"][0]
        for entry in scrub_case["history"].values()
        if "klein_scrub" in entry.get("outputs", {}).get(node_id, {})
    ]
    assert recorded and recorded[-1] == meta


@pytest.mark.parametrize("mode", MODES)
def test_workflow_scrubber_mouse_and_keys(workflow_run, mode: str) -> None:
    """On the rendered result, in each renderer: the mouse drags the frame slider to the last and the first
    frame, Right steps one frame, Up steps the checkpoint keeping the scale, Left steps back; the label and the
    served image follow."""
    meta, m = workflow_run["meta"], workflow_run["modes"][mode]
    assert m["inVueNode"] is (mode == "vue")
    frame_of(meta, m["dragEnd"], len(meta["frames"]) - 1)
    frame_of(meta, m["dragStart"], 0)
    frame = 0
    for obs in m["keys"]:
        frame = {
            "ArrowRight": frame + 1,
            "ArrowLeft": frame - 1,
            "ArrowUp": moved(meta, frame, "step", 1),
            "ArrowDown": moved(meta, frame, "step", -1),
        }[obs["key"]]
        frame_of(meta, obs, frame)
    assert (ARTIFACTS / f"scrub-workflow-{mode}.png").stat().st_size > 0


def test_workflow_position_survives_page_reload(workflow_run) -> None:
    """The frontend stores the open workflow with the widget's frame in the node's properties; after a real page
    reload it restores the workflow and the widget shows the same frame and label, without running it again."""
    before, after = workflow_run["beforeReload"], workflow_run.get("afterReload")
    assert workflow_run["persisted"], "no stored workflow held the scrub node at the shown frame before the reload"
    assert workflow_run["reloadedFound"], "after the reload no scrub node restored its result"
    assert after is not None
    frame_of(workflow_run["meta"], after, before["frame"])
    assert after["label"] == before["label"] and before["frame"] > 0
