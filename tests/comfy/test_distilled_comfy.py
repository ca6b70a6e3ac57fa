"""Train on Base, use on the distilled Klein: a LoRA of a Base run loads on a distilled-flavour tiny Klein (same
layout, other weights) in every loader, and the scrub and mixer grid sample it with the distilled settings.

Locked in: the pack's block loader, its mixer and core's Load LoRA place every key of a Base checkpoint on the
distilled model and agree (≤ 1e-4); `sampling` "distilled: 4 steps, cfg 1" renders exactly what KSampler gives
at 4 steps, cfg 1, and "as set" keeps the steps and cfg widgets.
"""

from __future__ import annotations

import pytest
import torch
from harness.comfy_test_nodes import FakeClip
from harness.fixtures import tiny_distilled_path
from harness.predict import core_merged, predict
from harness.runs import make_tiny_run
from harness.scrub import scrub_run

SIZE = 64
RENDER = dict(seed=3, steps=3, cfg=2.0, sampler_name="euler", scheduler="simple", width=SIZE, height=SIZE)
PROMPT = "a TOK cat"
CHECKPOINT = "base_run/checkpoints/step_000002.safetensors"


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, flux2_vae_file, tmp_path_factory):
    """ComfyUI in-process: the tiny Base and its distilled flavour loaded by UNETLoader, the VAE, a Base run."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder, runs_dir
    from klein_lora_lab.trainer_core.model.klein import read_shape

    import nodes

    out = tmp_path_factory.mktemp("distilled_output")
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    distilled_file = tiny_distilled_path()
    for path in (tiny_model_file, distilled_file):
        folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    register_runs_folder()
    make_tiny_run(runs_dir(), "base_run", (1, 2))
    (base,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (distilled,) = nodes.UNETLoader().load_unet(distilled_file.name, "default")
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    shape = read_shape(distilled.model.diffusion_model)
    yield {"base": base, "distilled": distilled, "vae": vae, "ctx": shape.context_dim}
    folder_paths.set_output_directory(previous_output)


def test_a_base_lora_loads_on_the_distilled_klein_in_every_loader(env) -> None:
    """The distilled flavour is another model (its prediction differs from Base's); a Base run's checkpoint
    loads on it through the pack's block loader and its mixer with every key, and both equal core's Load LoRA
    merging the same file into the distilled model."""
    import comfy.utils
    import folder_paths
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer

    model, ctx = env["distilled"], env["ctx"]
    plain = predict(model, ctx)
    assert (plain - predict(env["base"], ctx)).abs().max() > 1e-3
    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    with torch.inference_mode():
        blocks = KleinLabLoraLoaderBlocks.execute(model, CHECKPOINT, 1.0, "all", 1.0, "", **groups)
    assert "NOT loaded" not in blocks.ui["text"][0]
    slots = {}
    for i in range(1, 5):
        slots.update({f"on_{i}": i == 1, f"lora_{i}": CHECKPOINT if i == 1 else "None", f"scale_{i}": 1.0})
        slots[f"preset_{i}"] = "all"
    with torch.inference_mode():
        mixed = KleinLabLoraMixer.execute(model, **slots)
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", CHECKPOINT), safe_load=True)
    core = predict(core_merged(model, sd, 1.0), ctx)
    by_blocks, by_mixer = predict(blocks.result[0], ctx), predict(mixed.result[0], ctx)
    assert (core - plain).abs().max() > 1e-3
    assert (by_blocks - core).abs().max() < 1e-4
    assert (by_mixer - core).abs().max() < 1e-4


def _scrub(env, **overrides):
    """The Scrub Run node on the distilled model, defaults: the Base run's last checkpoint, scales 0 and 1."""
    defaults = dict(
        model=env["distilled"], vae=env["vae"], run="base_run", checkpoints="last 1", scales="0,1", prompts=PROMPT
    )
    return scrub_run({**defaults, **RENDER}, **overrides)


def _ksampler(env, steps: int, cfg: float) -> torch.Tensor:
    from klein_lora_lab.nodes.comfy.images import decode_images
    from klein_lora_lab.nodes.comfy.render import RenderSettings, encode_prompts, render_latent

    positive, negative = encode_prompts(FakeClip(), [PROMPT, ""])
    settings = RenderSettings(**{**RENDER, "steps": steps, "cfg": cfg})
    with torch.inference_mode():
        return decode_images(render_latent(env["distilled"], positive, negative, settings), env["vae"])


def test_scrub_samples_the_distilled_klein_at_4_steps_cfg_1(env) -> None:
    """With sampling "distilled: 4 steps, cfg 1" the scrub's scale-0 frame is KSampler's render at 4 steps and
    cfg 1 (whatever the steps/cfg widgets say) and the title says so; "as set" renders the widgets' 3 steps, cfg 2."""
    distilled = _scrub(env, sampling="distilled: 4 steps, cfg 1")
    frames = distilled.result[0]
    assert (frames[0] - _ksampler(env, 4, 1.0)[0]).abs().max() <= 1e-5
    assert (frames[0] - _ksampler(env, 3, 2.0)[0]).abs().max() > 1e-3
    assert (frames[1] - frames[0]).abs().mean() > 1e-4  # the Base LoRA acts on the distilled model
    as_set = _scrub(env, sampling="as set").result[0]
    assert (as_set[0] - _ksampler(env, 3, 2.0)[0]).abs().max() <= 1e-5
    assert (_scrub(env).result[0][0] - as_set[0]).abs().max() == 0  # the widget left out: as set


def test_mixer_grid_samples_the_distilled_klein_at_4_steps_cfg_1(env) -> None:
    """The mixer grid's (0, 0) cell with sampling distilled is KSampler's render at 4 steps, cfg 1."""
    from klein_lora_lab.nodes.scrub.mixer_grid import KleinLabMixerGrid

    with torch.inference_mode():
        result = KleinLabMixerGrid.execute(
            env["distilled"],
            env["vae"],
            CHECKPOINT,
            "0,1",
            "all",
            CHECKPOINT,
            "0",
            "all",
            PROMPT,
            clip=FakeClip(),
            sampling="distilled: 4 steps, cfg 1",
            **RENDER,
        )
    assert (result.result[0][0] - _ksampler(env, 4, 1.0)[0]).abs().max() <= 1e-5
