"""Diagnostics through real ComfyUI on a real tiny-model run (harness.runs.make_tiny_run): the diagnose node renders
base + checkpoint × scale × prompt with ComfyUI's sampler and the random Flux2 VAE, writes one record per checkpoint
× scale into <run>/diagnostics.json and leaves the input MODEL untouched; the sweet-spot node reads that file and
returns a checkpoint of the loras list and a measured scale; the lint node reports an album. Times are printed,
never asserted."""

from __future__ import annotations

import json
import time

import pytest
import torch
from harness.comfy_test_nodes import FakeClip
from harness.runs import DEFAULT_CAPTION, make_tiny_run, tiny_run_latent
from PIL import Image

SIZE = 64  # a 4×4 latent, as the run was trained
RUN_STEPS = (1, 2, 3)
RENDER = dict(seed=5, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", width=SIZE, height=SIZE)
PROMPTS = dict(
    trigger_prompts=DEFAULT_CAPTION,
    novel_prompts="a photo of [trigger] riding a bicycle",
    trigger_free_prompts="a bowl of fruit on a wooden table",
)


@pytest.fixture(scope="module")
def diag_env(comfy_root, tiny_model_file, flux2_vae_file, tmp_path_factory):
    """ComfyUI in-process with a temporary output folder, the tiny model and VAE loaded, a 3-checkpoint run and
    the encoded album it trained on (its one latent with FakeClip's conditioning of its caption)."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder, runs_dir
    from klein_lora_lab.trainer_core.album.latent_cache import EncodedDataset
    from klein_lora_lab.trainer_core.training.data import TrainItem

    import nodes

    out = tmp_path_factory.mktemp("diag_output")
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    register_runs_folder()
    run = make_tiny_run(runs_dir(), "diag", RUN_STEPS)
    clip = FakeClip()
    context = clip.encode_from_tokens_scheduled(clip.tokenize(DEFAULT_CAPTION))[0][0][0]
    encoded = EncodedDataset(
        items=(TrainItem(tiny_run_latent(), context, name="tiny"),),
        captions=(DEFAULT_CAPTION,),
        empty_context=None,
        validation_prompts=(),
        validation_contexts=(),
        dataset_hash="tiny-album",
        trigger="TOK",
        kind="images",
        encoded=0,
        cached=1,
        seconds=0.0,
    )
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    yield {"model": model, "vae": vae, "run": run, "encoded": encoded, "output": out}
    folder_paths.set_output_directory(previous_output)


def diagnose(env, **overrides):
    from klein_lora_lab.nodes.diagnose.diagnose_run import KleinLabDiagnoseRun

    args = dict(
        model=env["model"],
        clip=FakeClip(),
        vae=env["vae"],
        encoded_dataset=env["encoded"],
        run="diag",
        checkpoints="all",
        scales="1,2",
        **PROMPTS,
        **RENDER,
    )
    args.update(overrides)
    with torch.inference_mode():  # as ComfyUI executes nodes
        return KleinLabDiagnoseRun.execute(**args)


def test_diagnose_writes_a_record_per_checkpoint_and_scale(diag_env):
    """Every checkpoint × scale gets a record with every measure, its LoRA as the loras list names it and the
    clinic's findings; the LoRA changes the picture more at scale 2 than at 1; the input MODEL keeps no patch and
    the base frame of a prompt equals a plain render of that prompt on the input MODEL."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.images import decode_images
    from klein_lora_lab.nodes.comfy.render import RenderSettings, encode_prompts, render_latent
    from klein_lora_lab.trainer_core.analysis.sweet_spot import read_diagnostics

    model = diag_env["model"]
    patches = dict(model.patches)
    start = time.perf_counter()
    out = diagnose(diag_env)
    seconds = time.perf_counter() - start
    report, chart, frames = out.result
    print(f"\ndiagnose: 3 checkpoints × 2 scales × 3 prompts on the tiny model: {seconds:.2f} s\n{report}")
    data = read_diagnostics(diag_env["run"].path)
    assert [(r["step"], r["scale"]) for r in data["records"]] == [(s, c) for s in RUN_STEPS for c in (1.0, 2.0)]
    loras = set(folder_paths.get_filename_list("loras"))
    for r in data["records"]:
        for key in ("concept", "memorisation", "memorisation_latent", "memorisation_pixel", "flexibility"):
            assert isinstance(r[key], float), (key, r)
        assert isinstance(r["trigger_free_drift"], float) and isinstance(r["findings"], list)
        assert r["lora"] in loras and r["lora"].endswith(f"step_{r['step']:06d}.safetensors")
    # Three steps barely move this LoRA (it changes the picture, but not toward the album): the clinic calls
    # every record timid and the suggestion says to train longer.
    assert all(r["findings"] == ["underfit/timid"] for r in data["records"])
    assert "underfit/timid" in report.split("sweet spot:", 1)[1] and "Train longer" in report
    by = {(r["step"], r["scale"]): r for r in data["records"]}
    for step in RUN_STEPS:
        assert 0 < by[(step, 1.0)]["change"] < by[(step, 2.0)]["change"]
    assert data["config"]["prompts"]["novel"] == ["a photo of TOK riding a bicycle"]
    assert frames.shape == (3 * (1 + 3 * 2), SIZE, SIZE, 3) and chart.shape[-1] == 3
    assert "sweet spot: checkpoint step" in report and "step 3 · scale 2:" in report
    assert dict(model.patches) == patches
    with torch.inference_mode():  # the base frame of the first prompt, rendered again on the input MODEL
        clip = FakeClip()
        positive, negative = encode_prompts(clip, [DEFAULT_CAPTION, ""])
        base = decode_images(render_latent(model, positive, negative, RenderSettings(**RENDER)), diag_env["vae"])
    assert torch.allclose(base[0], frames[0], atol=2e-3)


def test_sweet_spot_node_reads_the_diagnostics(diag_env):
    """The sweet-spot node returns a checkpoint of the run (as the loras list names it) and a scale that was
    measured, with the reasons and a chart of the asked size."""
    import folder_paths
    from klein_lora_lab.nodes.diagnose.sweet_spot import KleinLabSweetSpot
    from klein_lora_lab.trainer_core.analysis.sweet_spot import read_diagnostics

    if read_diagnostics(diag_env["run"].path) is None:
        diagnose(diag_env)
    text, chart, lora_name, scale = KleinLabSweetSpot.execute("diag", 800, 360).result
    assert lora_name in folder_paths.get_filename_list("loras") and lora_name.startswith("diag/checkpoints/step_")
    assert scale in (1.0, 2.0) and chart.shape == (1, 360, 800, 3)
    assert text.startswith("sweet spot: checkpoint step") and f"LoRA: {lora_name}" in text
    records = read_diagnostics(diag_env["run"].path)["records"]
    step = int(lora_name.rsplit("step_", 1)[1].split(".")[0])
    assert (step, scale) in {(r["step"], r["scale"]) for r in records}


def test_lint_node_reports_an_album(diag_env):
    """The lint node resolves an album inside ComfyUI's folders and names the files of each finding, in text
    and JSON."""
    from klein_lora_lab.nodes.diagnose.dataset_lint import KleinLabDatasetLint

    album = diag_env["output"] / "lint_album"
    album.mkdir()
    for i in range(2):
        img = Image.effect_noise((640, 640), 40 + 30 * i).convert("RGB")
        img.save(album / f"{i:03d}.png")
    (album / "000.txt").write_text("a photo of TOK")
    start = time.perf_counter()
    text, payload, _learned = KleinLabDatasetLint.execute(str(album), "", "TOK", "character", 512).result
    print(f"\nlint node: 2 images in {time.perf_counter() - start:.3f} s")
    findings = json.loads(payload)["findings"]
    assert [f["files"] for f in findings if f["code"] == "missing_caption"] == [["001.png"]]
    assert "001.png" in text and "add 18" in text


def test_train_node_validation_widgets(comfy_root):
    """The train node's validation_every widget: 0 (or absent, as in workflows saved before it existed) follows
    sample_every, any other value is its own cadence; validation_holdout reaches the settings."""
    from klein_lora_lab.nodes.train.train_lora import settings_from_widgets

    assert settings_from_widgets("style", sample_every=5).validation_every == 5
    assert settings_from_widgets("style", sample_every=5, validation_every=0).validation_every == 5
    assert settings_from_widgets("style", sample_every=5, validation_every=3).validation_every == 3
    assert settings_from_widgets("style", validation_holdout=0.2).validation_holdout == 0.2
    assert settings_from_widgets("style").validation_holdout == 0.0  # callers without the widget: as before
