"""Checkpoint scrubbing, the mixer grid and the A/B compare through real ComfyUI, on a real tiny-model run.

In process: a run trained on the tiny Klein (harness.runs.make_tiny_run) is scrubbed 3 checkpoints × 3 scales with
ComfyUI's own sampler and the random Flux2 VAE. Through the server: the same grid from a prompt, its files served
by /view, and the example workflows checked against /object_info. Times are printed, never asserted.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch
from harness.comfy_test_nodes import FakeClip
from harness.runs import make_tiny_run
from harness.scrub import scrub_run

SIZE = 64  # frame width/height: a 4×4 latent, as the run was trained
RENDER = dict(seed=3, steps=3, cfg=2.0, sampler_name="euler", scheduler="simple", width=SIZE, height=SIZE)
RUN_STEPS = (1, 2, 3)
PROMPT = "a TOK cat"


@pytest.fixture(scope="module")
def scrub_env(comfy_root, tiny_model_file, flux2_vae_file, tmp_path_factory):
    """ComfyUI in-process with a temporary output folder, the tiny model and VAE loaded, and a 3-checkpoint run."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder, runs_dir

    import nodes

    out = tmp_path_factory.mktemp("scrub_output")
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    register_runs_folder()
    run = make_tiny_run(runs_dir(), "arc", RUN_STEPS)
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    yield {"model": model, "vae": vae, "output": out, "run": run}
    folder_paths.set_output_directory(previous_output)  # other in-process tests keep ComfyUI's own folder


def scrub(env, **overrides):
    """KleinLabScrubRun.execute as ComfyUI calls it (under inference mode), defaults: the run, 3 scales, 1 prompt."""
    defaults = dict(model=env["model"], vae=env["vae"], run="arc", checkpoints="all", scales="0,1,2", prompts=PROMPT)
    return scrub_run({**defaults, **RENDER}, **overrides)


def base_render(env, prompt: str = PROMPT) -> torch.Tensor:
    """The frame the base model (no LoRA) gives with the same widgets, through the shared render helper."""
    from klein_lora_lab.nodes.comfy.images import decode_images
    from klein_lora_lab.nodes.comfy.render import RenderSettings, encode_prompts, render_latent

    clip = FakeClip()
    positive, negative = encode_prompts(clip, [prompt, ""])
    with torch.inference_mode():
        return decode_images(render_latent(env["model"], positive, negative, RenderSettings(**RENDER)), env["vae"])


def mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_scrub_grid_order_scale_zero_and_no_reload(scrub_env, monkeypatch, caplog, capsys):
    """A 3-checkpoint × 3-scale scrub: frames in checkpoint-major order with matching labels, scale-0 frames equal
    the base model's render, frames differ across checkpoints and scales where the LoRA acts, the base weights are
    never reloaded or patched, the input MODEL is untouched, and the UI metadata points at files on disk."""
    import comfy.model_patcher
    import comfy.sd
    from klein_lora_lab.nodes.comfy.forward_loras import forward_loras_of
    from klein_lora_lab.nodes.comfy.render import SCRUB_UI_KEY, THUMB_SIZE
    from PIL import Image

    model = scrub_env["model"]
    calls = {"patch": 0, "load": 0}
    patch_weight = comfy.model_patcher.ModelPatcher.patch_weight_to_device
    load_unet = comfy.sd.load_diffusion_model

    def counting_patch(self, key, *args, **kwargs):
        # ComfyUI calls this for every weight it loads; only a key with patches would change the weights
        calls["patch"] += key in self.patches
        return patch_weight(self, key, *args, **kwargs)

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return load_unet(*args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_weight_to_device", counting_patch)
    monkeypatch.setattr(comfy.sd, "load_diffusion_model", counting_load)
    weight = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    before = (weight.data_ptr(), weight.detach().clone())

    caplog.set_level(logging.INFO, logger="klein_lora_lab")
    start = time.perf_counter()
    result = scrub(scrub_env)
    seconds = time.perf_counter() - start

    frames, grid, labels_json = result.result
    labels = json.loads(labels_json)
    assert [(r["step"], r["scale"]) for r in labels] == [(s, c) for s in RUN_STEPS for c in (0.0, 1.0, 2.0)]
    assert [r["index"] for r in labels] == list(range(9))
    assert labels[4]["label"] == "step 2 · scale 1" and labels[4]["prompt"] == PROMPT
    assert labels[4]["lora"] == "arc/checkpoints/step_000002.safetensors"
    assert frames.shape == (9, SIZE, SIZE, 3)
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[1] > SIZE * 3

    base = base_render(scrub_env)[0]
    for i in (0, 3, 6):  # scale 0 of every checkpoint
        # equal up to the VAE decoding frames in batches of 8 instead of one by one
        assert (frames[i] - base).abs().max() <= 1e-5, f"frame {i} (scale 0) differs from the base model's render"
    for i in (1, 2, 4, 5, 7, 8):
        assert mean_diff(frames[i], base) > 1e-4, f"frame {i} shows no LoRA effect"
    for scale_col in (1, 2):  # across checkpoints at the same scale
        picks = [frames[3 * c + scale_col] for c in range(3)]
        assert mean_diff(picks[0], picks[1]) > 1e-4 and mean_diff(picks[1], picks[2]) > 1e-4
    for c in range(3):  # across scales of one checkpoint
        assert mean_diff(frames[3 * c + 1], frames[3 * c + 2]) > 1e-4

    assert calls == {"patch": 0, "load": 0}
    assert weight.data_ptr() == before[0] and torch.equal(weight, before[1])
    assert model.patches == {} and forward_loras_of(model) is None

    ui = result.ui
    meta = ui[SCRUB_UI_KEY][0]
    assert set(ui) == {SCRUB_UI_KEY}
    assert meta["version"] == 1 and meta["node"] == "KleinLabScrubRun"
    assert meta["axes"] == [
        {"name": "step", "values": list(RUN_STEPS)},
        {"name": "scale", "values": [0.0, 1.0, 2.0]},
        {"name": "prompt", "values": [PROMPT]},
    ]
    assert [f["coords"] for f in meta["frames"]] == [[c, s, 0] for c in range(3) for s in range(3)]
    assert [f["label"] for f in meta["frames"]] == [r["label"] for r in labels]
    out = scrub_env["output"]
    subfolder = meta["frames"][0]["image"]["subfolder"]
    assert subfolder.startswith("klein_lora_lab/scrub/arc/") and len(subfolder.rsplit("/", 1)[1]) == 8
    for i, entry in enumerate(meta["frames"]):
        assert entry["image"] == {"filename": f"frame_{i:04d}.png", "subfolder": subfolder, "type": "output"}
        png = Image.open(out / subfolder / entry["image"]["filename"])
        assert png.size == (SIZE, SIZE)
        saved = torch.from_numpy(np.asarray(png, dtype="float32") / 255.0)
        assert (saved - frames[i]).abs().max() <= 1 / 255 + 1e-6
        thumb = Image.open(out / subfolder / entry["thumb"]["filename"])
        assert max(thumb.size) <= THUMB_SIZE
    assert (out / meta["grid"]["subfolder"] / meta["grid"]["filename"]).is_file()
    (timing,) = [r.getMessage() for r in caplog.records if "scrub arc:" in r.getMessage()]
    with capsys.disabled():
        setup = f"tiny Klein, {SIZE}², {RENDER['steps']} steps, cfg {RENDER['cfg']}"
        print(f"\n[scrub] 3×3 in process ({setup}): {seconds:.2f} s")
        print(f"[scrub] node: {timing}")


def test_scrub_prompts_axis_and_lora_files(scrub_env):
    """Two prompts make a third axis (checkpoint, scale, prompt order); LoRA files given by name work without a
    run, with a positive conditioning and cfg 1 (no negative needed), keeping the order given."""
    from klein_lora_lab.nodes.comfy.render import SCRUB_UI_KEY, encode_prompts

    result = scrub(scrub_env, checkpoints="last 1", scales="0,1", prompts=f"{PROMPT}\n\na bicycle\n")
    labels = json.loads(result.result[2])
    assert [(r["scale"], r["prompt"]) for r in labels] == [
        (0.0, PROMPT),
        (0.0, "a bicycle"),
        (1.0, PROMPT),
        (1.0, "a bicycle"),
    ]
    assert labels[3]["label"] == "step 3 · scale 1 · prompt 2"
    assert (result.result[0][1] - base_render(scrub_env, "a bicycle")[0]).abs().max() <= 1e-5
    assert result.ui[SCRUB_UI_KEY][0]["frames"][3]["coords"] == [0, 1, 1]

    (positive,) = encode_prompts(FakeClip(), [PROMPT])
    files = "arc/checkpoints/step_000003.safetensors\narc/checkpoints/step_000001.safetensors"
    result = scrub(
        scrub_env, run="(LoRA files below)", lora_files=files, scales="1", clip=None, positive=positive, cfg=1.0
    )
    labels = json.loads(result.result[2])
    assert [r["step"] for r in labels] == [3, 1] and labels[0]["prompt"] == "(positive input)"
    assert mean_diff(result.result[0][0], result.result[0][1]) > 1e-4


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"checkpoints": "5"}, "steps: 1, 2, 3"),
        ({"checkpoints": ""}, "run has steps 1, 2, 3"),
        ({"scales": "0,6"}, "outside -4..4"),
        ({"clip": None}, "connect a clip"),
        ({"clip": None, "positive": "cond"}, "cfg=2 needs a negative"),
        ({"run": "(LoRA files below)", "lora_files": "nope.safetensors"}, "not in ComfyUI's loras list"),
        ({"scales": "0:0.99:0.01"}, "300 frames requested; one scrub renders at most 256"),
    ],
)
def test_scrub_input_errors(scrub_env, overrides, needle):
    """Bad inputs stop before any rendering, with a message naming the value and the fix."""
    from klein_lora_lab.nodes.comfy.render import encode_prompts
    from klein_lora_lab.trainer_core.analysis.scrub import ScrubError

    if overrides.get("positive") == "cond":
        overrides["positive"] = encode_prompts(FakeClip(), [PROMPT])[0]
    with pytest.raises(ScrubError, match=needle):
        scrub(scrub_env, **overrides)


def test_scrub_honours_cancel(scrub_env):
    """Cancel (ComfyUI's interrupt flag) stops a scrub with ComfyUI's own interruption, not an error or a result,
    and the input MODEL stays untouched."""
    import comfy.model_management as mm
    from klein_lora_lab.nodes.comfy.forward_loras import forward_loras_of

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            scrub(scrub_env, scales="1")
    finally:
        mm.interrupt_current_processing(False)
    assert forward_loras_of(scrub_env["model"]) is None and scrub_env["model"].patches == {}


def test_mixer_grid_cells(scrub_env):
    """LoRA A × LoRA B scales: cells are scale_a-major, the (0, 0) cell is the base render, each LoRA changes the
    image, both together differ from either alone, and the UI metadata has the scale_a/scale_b axes."""
    from klein_lora_lab.nodes.comfy.render import SCRUB_UI_KEY
    from klein_lora_lab.nodes.scrub.mixer_grid import KleinLabMixerGrid

    lora_a, lora_b = "arc/checkpoints/step_000001.safetensors", "arc/checkpoints/step_000003.safetensors"
    with torch.inference_mode():
        result = KleinLabMixerGrid.execute(
            scrub_env["model"],
            scrub_env["vae"],
            lora_a,
            "0,1",
            "all",
            lora_b,
            "0,1",
            "all",
            PROMPT,
            clip=FakeClip(),
            **RENDER,
        )
    frames, grid, labels_json = result.result
    labels = json.loads(labels_json)
    assert [(r["scale_a"], r["scale_b"]) for r in labels] == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    assert labels[3]["label"] == "step_000001 1 · step_000003 1"
    assert (frames[0] - base_render(scrub_env)[0]).abs().max() <= 1e-5
    for i, j in ((0, 1), (0, 2), (1, 3), (2, 3), (1, 2)):
        assert mean_diff(frames[i], frames[j]) > 1e-4, f"cells {i} and {j} are equal"
    meta = result.ui[SCRUB_UI_KEY][0]
    assert meta["node"] == "KleinLabMixerGrid"
    assert meta["axes"] == [{"name": "scale_a", "values": [0.0, 1.0]}, {"name": "scale_b", "values": [0.0, 1.0]}]
    assert [f["coords"] for f in meta["frames"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert meta["grid"]["subfolder"].startswith("klein_lora_lab/scrub/mixer_step_000001_x_step_000003/")
    assert grid.shape[0] == 1


def test_compare_frames_by_index_and_label(comfy_root):
    """A/B compare picks frames by index or label, puts A left and B right, and reports |A − B| and its mean."""
    from klein_lora_lab.nodes.scrub.compare_frames import KleinLabCompareFrames
    from klein_lora_lab.trainer_core.analysis.scrub import ScrubError

    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 16, 16, 3, generator=gen)
    labels = json.dumps([{"index": i, "label": f"step {s} · scale 1"} for i, s in enumerate((300, 600, 900))])
    with torch.inference_mode():
        result = KleinLabCompareFrames.execute(frames, labels, 0, 0, "step 900 · scale 1", "600", 1.0)
    pair, difference, mean = result.result
    assert torch.allclose(difference[0], (frames[2] - frames[1]).abs(), atol=1e-6)
    assert mean == pytest.approx((frames[2] - frames[1]).abs().mean().item(), abs=1e-6)
    assert pair.shape[0] == 1 and pair.shape[2] > 2 * 16
    assert "A = #2 step 900 · scale 1" in result.ui["text"][0] and f"{mean:.6f}" in result.ui["text"][0]
    with torch.inference_mode():
        same = KleinLabCompareFrames.execute(frames, labels, 1, 1, "", "", 4.0).result
    assert same[2] == 0.0 and same[1].abs().max() == 0
    with pytest.raises(ScrubError, match="batch has 2"):
        KleinLabCompareFrames.execute(frames[:2], labels, 0, 1, "", "", 1.0)
    with pytest.raises(ScrubError, match="frames 0..2"):
        KleinLabCompareFrames.execute(frames, labels, 0, 5, "", "", 1.0)


# ----------------------------------------------------------------------------------------------- the server

SCRUB_WORKFLOW = "Klein 03 - Scrub the checkpoints of a run.json"
MIXER_WORKFLOW = "Klein 05 - Mix two LoRAs on a grid.json"
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "IMAGE", "KLEIN_SWEEP"}


def _workflow(name: str) -> dict:
    from harness.comfy_env import PACK_ROOT

    return json.loads((PACK_ROOT / "workflows" / name).read_text())


@pytest.mark.parametrize("name", [SCRUB_WORKFLOW, MIXER_WORKFLOW])
def test_scrub_workflows_match_the_server_nodes(comfy_server, name):
    """Each scrub workflow uses nodes the server knows, our nodes' inputs in the server's order with one widget
    value per widget (plus the seed's control value), valid sampler/scheduler/preset choices, consistent links,
    and it converts to an API prompt the way the frontend queues it."""
    from harness.workflow_prompt import workflow_to_prompt

    workflow, info = _workflow(name), comfy_server.object_info()
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        assert node["type"] in info, node["type"]
        if not node["type"].startswith("KleinLab"):
            continue
        spec = info[node["type"]]
        order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
        assert [i["name"] for i in node["inputs"]] == order, node["type"]
        entries = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        widgets = [n for n in order if entries[n][0] not in SOCKET_TYPES and not entries[n][1].get("forceInput")]
        values = list(node["widgets_values"])
        if "seed" in widgets:  # the frontend stores the seed's control_after_generate value right after it
            values.pop(widgets.index("seed") + 1)
        assert len(values) == len(widgets), node["type"]
        for widget, value in zip(widgets, values, strict=True):
            if widget in ("sampler_name", "scheduler", "block_preset", "preset_a", "preset_b"):
                assert value in entries[widget][1]["options"], (node["type"], widget, value)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] == by_id[src]["outputs"][src_slot]["type"] == kind
    prompt = workflow_to_prompt(workflow, info)
    assert {n["class_type"] for n in prompt.values()} >= {"KleinLabCompareFrames", "UNETLoader", "VAELoader"}


def test_scrub_workflow_renders_a_3x3_grid_through_the_server(comfy_root, comfy_server, capsys):
    """The shipped scrub workflow, swapped onto the tiny model and pointed at a 3-checkpoint run with 3 scales,
    renders through /prompt: the scrubber metadata lists 9 frames in checkpoint-major order, every frame,
    thumbnail and the grid are served by /view, scale-0 frames are identical across checkpoints (the base
    model), scale-1 frames differ between checkpoints, and the A/B node reports the mean difference."""
    import io as _io
    import re
    import uuid

    from harness.workflow_prompt import swap_for_tiny, workflow_to_prompt
    from klein_lora_lab.nodes.comfy.render import SCRUB_UI_KEY, THUMB_SIZE
    from PIL import Image

    run_name = f"scrub_srv_{uuid.uuid4().hex[:6]}"
    make_tiny_run(comfy_server.base_dir / "output" / "klein_lora_lab" / "runs", run_name, RUN_STEPS)
    info = comfy_server.object_info()  # the run is listed now
    prompt = workflow_to_prompt(_workflow(SCRUB_WORKFLOW), info)
    swap = swap_for_tiny(prompt, info, input_dir=comfy_server.base_dir / "input", available=[run_name])
    scrub_id = next(nid for nid, n in swap.prompt.items() if n["class_type"] == "KleinLabScrubRun")
    compare_id = next(nid for nid, n in swap.prompt.items() if n["class_type"] == "KleinLabCompareFrames")
    swap.prompt[scrub_id]["inputs"].update(run=run_name, checkpoints="all", scales="0,1,2", prompts=PROMPT, **RENDER)

    start = time.perf_counter()
    outputs = comfy_server.run_prompt(swap.prompt, timeout_s=900)
    seconds = time.perf_counter() - start

    assert set(outputs[scrub_id]) == {SCRUB_UI_KEY}
    meta = outputs[scrub_id][SCRUB_UI_KEY][0]
    assert meta["axes"][0] == {"name": "step", "values": list(RUN_STEPS)}
    assert meta["axes"][1] == {"name": "scale", "values": [0.0, 1.0, 2.0]}
    assert [f["label"] for f in meta["frames"]] == [f"step {s} · scale {c}" for s in RUN_STEPS for c in (0, 1, 2)]
    pngs = []
    for entry in meta["frames"]:
        png = comfy_server.view_file(**{k: entry["image"][k] for k in ("filename", "subfolder")})
        assert Image.open(_io.BytesIO(png)).size == (SIZE, SIZE)
        pngs.append(png)
        thumb = comfy_server.view_file(**{k: entry["thumb"][k] for k in ("filename", "subfolder")})
        assert max(Image.open(_io.BytesIO(thumb)).size) <= THUMB_SIZE
    grid = Image.open(_io.BytesIO(comfy_server.view_file(meta["grid"]["filename"], meta["grid"]["subfolder"])))
    assert grid.width > 3 * SIZE and grid.height > 3 * SIZE
    assert pngs[0] == pngs[3] == pngs[6]  # scale 0: the base model at every checkpoint
    assert len({pngs[1], pngs[4], pngs[7]}) == 3  # scale 1: three different checkpoints
    assert "mean |A − B| = " in outputs[compare_id]["text"][0]

    timing = re.findall(rf"scrub {run_name}: (.*)", comfy_server.log_text())
    with capsys.disabled():
        print(f"\n[scrub] 3×3 grid through the server: {seconds:.1f} s for the prompt; node: {timing[-1]}")
