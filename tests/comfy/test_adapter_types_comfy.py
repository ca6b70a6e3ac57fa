"""Every Klein adapter type through real ComfyUI: our forward-time loaders against core's LoraLoader and against
the tool that made the file.

The tiny Klein is loaded by core's UNETLoader. LyCORIS wraps a copy of that very diffusion model, so its file
fits it and its own forward gives the tool's weights (`effective_weights`); those weights, saved as a diffusion
model and loaded by core, give the tool's output through ComfyUI. diffusers + PEFT make a diffusers-style file
whose alpha lives only in its `lora_adapter_metadata` header.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from harness.adapter_files import (
    LYCORIS_KINDS,
    effective_weights,
    lycoris_file,
    lycoris_module_names,
    restyle,
)
from harness.predict import core_merged, predict

pytest.importorskip("lycoris", reason="lycoris-lora makes the LyCORIS files (pip install -r tests/requirements.txt)")

# LyCORIS' default DoRA (and DoRA LoKr) keeps one magnitude per output row; core's LoraLoader divides by the norm
# of the base weight there instead of the norm of the merged weight, so it differs from LyCORIS on those files.
CORE_DIFFERS = {"DoRA (per output row)", "DoRA LoKr"}


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, tmp_path_factory):
    """ComfyUI in-process, the tiny Klein loaded by UNETLoader, an empty loras folder."""
    import folder_paths
    from klein_lora_lab.trainer_core.model.klein import read_shape

    import nodes

    loras = tmp_path_factory.mktemp("loras_types")
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("loras", str(loras))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    return {"model": model, "shape": read_shape(model.model.diffusion_model), "loras": loras, "tmp": loras}


def loader(model, name: str, strength: float, preset: str = "all", global_strength: float = 1.0):
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks

    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    return KleinLabLoraLoaderBlocks.execute(model, name, strength, preset, global_strength, "", **groups)


def tool_model(model, weights: dict[str, torch.Tensor], path: Path):
    """The diffusion model with the tool's effective weights, saved and loaded by core (the tool's output)."""
    import comfy.sd
    from safetensors.torch import save_file

    sd = {k: v.float().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    for name, w in weights.items():
        sd[f"{name}.weight"] = w
    save_file(sd, str(path))
    return comfy.sd.load_diffusion_model(str(path))


_MADE: dict[str, tuple] = {}


def _made(env, kind: str):
    """A LyCORIS file of `kind` for the loaded model, and the tool's output through ComfyUI (once per kind)."""
    if kind not in _MADE:
        import comfy.model_management

        comfy.model_management.load_models_gpu([env["model"]])  # undoes a merge an earlier core run left patched
        torch.manual_seed(0)
        made = lycoris_file(copy.deepcopy(env["model"].model.diffusion_model), kind, scale=0.1)
        names = lycoris_module_names(made.state_dict, made.base)
        slug = kind.replace(" ", "_").replace("(", "").replace(")", "")
        tool = tool_model(env["model"], effective_weights(made.wrapped, names), env["tmp"] / f"tool_{slug}.sft")
        _MADE[kind] = (made, predict(tool, env["shape"].context_dim))
    return _MADE[kind]


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_lycoris_file_equals_tool_and_core(env, kind: str) -> None:
    """A LyCORIS-made file of each type, through our loader, equals LyCORIS' own output and core's LoraLoader
    (≤ 1e-4) — except where core itself departs from LyCORIS (output-row DoRA), where it equals LyCORIS."""
    from safetensors.torch import save_file

    made, want_tool = _made(env, kind)
    name = f"lyco_{kind.replace(' ', '_').replace('(', '').replace(')', '')}.safetensors"
    save_file(made.state_dict, str(env["loras"] / name))
    ctx = env["shape"].context_dim
    base = predict(env["model"], ctx)
    out = loader(env["model"], name, 1.0)
    got = predict(out.result[0], ctx)
    # core maps no `lycoris_<ComfyUI name>` keys for Flux2: it gets the same tensors under ai-toolkit's key rule
    core = predict(core_merged(env["model"], restyle(made.state_dict, made.base, "ai-toolkit"), 1.0), ctx)
    print(
        f"\n[{kind}] |ours - LyCORIS| {(got - want_tool).abs().max():.2e}  |ours - core| {(got - core).abs().max():.2e}"
    )
    assert "NOT loaded" not in out.ui["text"][0]
    assert (want_tool - base).abs().max() > 1e-3
    assert (got - want_tool).abs().max() < 1e-4
    if kind in CORE_DIFFERS:
        assert (core - want_tool).abs().max() > 1e-3  # core's own departure; ours follows the tool
    else:
        assert (got - core).abs().max() < 1e-4


@pytest.mark.parametrize("style", ["ai-toolkit", "musubi"])
def test_lokr_key_rules_equal_core_with_strength_and_blocks(env, style: str) -> None:
    """LoKr under ai-toolkit's and musubi's key rules, at strength 0.6 in the texture blocks only, equals core
    merging only the texture blocks' keys at 0.6."""
    from klein_lora_lab.trainer_core.model.variants import block_groups
    from safetensors.torch import save_file

    made, _ = _made(env, "LoKr")
    sd = restyle(made.state_dict, made.base, style)
    name = f"lokr_{style}.safetensors"
    save_file(sd, str(env["loras"] / name))
    texture = block_groups(env["shape"])["texture"]
    keep = tuple(f"{b}." for b in texture) + tuple(f"{b.replace('.', '_')}_" for b in texture)
    only_texture = {k: v for k, v in sd.items() if any(p in k for p in keep)}
    assert only_texture and len(only_texture) < len(sd)
    ctx = env["shape"].context_dim
    got = predict(loader(env["model"], name, 0.6, preset="texture", global_strength=0.0).result[0], ctx)
    want = predict(core_merged(env["model"], only_texture, 0.6), ctx)
    assert (want - predict(env["model"], ctx)).abs().max() > 2e-4
    assert (got - want).abs().max() < 1e-4


def test_peft_header_file_equals_core_at_the_header_scale(env) -> None:
    """A diffusers + PEFT file with r 4, lora_alpha 8 only in its header: our loader at strength 1 equals core's
    LoraLoader at strength 2 (core reads no header and applies alpha = rank, half of what diffusers applies)."""
    pytest.importorskip("diffusers", reason="diffusers makes the PEFT file (pip install -r tests/requirements.txt)")
    from harness.diffusers_files import peft_lora_file, tiny_transformer
    from safetensors.torch import load_file

    s = env["shape"]
    path = env["loras"] / "peft_header.safetensors"
    peft_lora_file(tiny_transformer(s.hidden, s.double_blocks, s.single_blocks, s.context_dim), path, r=4, lora_alpha=8)
    ctx = s.context_dim
    out = loader(env["model"], path.name, 1.0)
    assert "lora_alpha 8" in out.ui["text"][0]
    got = predict(out.result[0], ctx)
    sd = load_file(str(path))
    want = predict(core_merged(env["model"], sd, 2.0), ctx)
    half = predict(core_merged(env["model"], sd, 1.0), ctx)
    print(
        f"\n[PEFT header] |ours - core x2| {(got - want).abs().max():.2e}, "
        f"|ours - core x1| {(got - half).abs().max():.2e}"
    )
    assert (got - want).abs().max() < 1e-4
    assert (got - half).abs().max() > 1e-3
