"""Klein Save LoRA as… through real ComfyUI: a mixed model (two LoRAs with scales and block presets, plus a
LyCORIS LoKr) saved as one file gives the mixed model's output when loaded back by core's LoraLoader, with no
unmatched key, in ComfyUI and kohya style; resizing reports the energy kept; the header names base and trigger."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from harness.adapter_files import lycoris_file, restyle
from harness.predict import core_merged, predict

pytest.importorskip("lycoris", reason="lycoris-lora makes the LoKr file (pip install -r tests/requirements.txt)")
# core maps no diffusers names for Klein's time embedder and global modulations: leave them out of these LoRAs
CORE_GLOBALS = ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, tmp_path_factory):
    """The tiny Klein, a loras folder with two plain LoRAs and a LyCORIS LoKr, and a mixed model of all three."""
    import comfy.model_management
    import folder_paths
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer
    from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
    from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes, write_diffusers, write_kohya
    from klein_lora_lab.trainer_core.model.block_weights import block_of
    from klein_lora_lab.trainer_core.model.klein import read_shape
    from safetensors.torch import save_file

    import nodes

    loras = tmp_path_factory.mktemp("loras_save")
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    comfy.model_management.load_models_gpu([model])
    shape = read_shape(model.model.diffusion_model)
    gen = torch.Generator().manual_seed(11)
    for i, writer in enumerate((write_kohya, write_diffusers)):
        weights = {}
        for name, (fan_out, fan_in) in sorted(klein_linear_shapes(shape).items()):
            if block_of(name) is None and name not in CORE_GLOBALS:
                continue
            down = torch.randn(4 + 2 * i, fan_in, generator=gen) * fan_in**-0.5
            weights[name] = LoraWeights(down, torch.randn(fan_out, 4 + 2 * i, generator=gen) * 0.08, alpha=8.0)
        save_file(writer(weights), str(loras / f"plain_{i}.safetensors"))
    torch.manual_seed(0)
    made = lycoris_file(copy.deepcopy(model.model.diffusion_model), "LoKr", scale=0.1)
    # a few modules only: a dense LoKr is written through an SVD per module, slow on a shared CPU
    lokr = {
        k: v
        for k, v in made.state_dict.items()
        if k.startswith(("lycoris_double_blocks_1_", "lycoris_single_blocks_2_"))
    }
    save_file(restyle(lokr, made.base, "ai-toolkit"), str(loras / "lokr.safetensors"))
    slot_defaults = (("on", True), ("lora", "None"), ("scale", 1.0), ("preset", "all"))
    empty = {f"{k}_{i}": v for i in range(1, 5) for k, v in slot_defaults}
    slots = {**empty, "lora_1": "plain_0.safetensors", "scale_1": 0.7, "preset_1": "texture"}
    slots |= {"lora_2": "plain_1.safetensors", "scale_2": -0.6}
    (mixed,) = KleinLabLoraMixer.execute(model, **slots).result
    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    (mixed,) = KleinLabLoraLoaderBlocks.execute(mixed, "lokr.safetensors", 0.5, "all", 1.0, "", **groups).result
    return {"model": model, "mixed": mixed, "shape": shape, "loras": loras}


def _save(env, fmt: str, rank: int = 0, prefix: str = "mixed"):
    from klein_lora_lab.nodes.loras.save_lora_as import KleinLabSaveLoraAs

    return KleinLabSaveLoraAs.execute(env["mixed"], "None", 1.0, fmt, rank, prefix, "TOKSTYLE")


@pytest.mark.parametrize("fmt", ["ComfyUI", "kohya"])
def test_saved_mix_loads_in_core_with_no_unmatched_key_and_same_output(env, fmt: str, caplog) -> None:
    """The mixed model saved as one file (scales, block presets and the LoKr baked in) loads in core's LoraLoader
    with no 'lora key not loaded' and gives the mixed model's output (≤ 1e-4)."""
    from safetensors.torch import load_file

    out = _save(env, fmt, prefix=f"mix_{fmt}")
    name = out.result[0]
    path = env["loras"] / name
    assert path.is_file() and name.startswith("klein_lora_lab/")
    ctx = env["shape"].context_dim
    want = predict(env["mixed"], ctx)
    with caplog.at_level(logging.WARNING):
        got = predict(core_merged(env["model"], load_file(str(path)), 1.0), ctx)
    assert "lora key not loaded" not in caplog.text
    assert (want - predict(env["model"], ctx)).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4
    assert "energy kept 100.00% overall" in out.ui["text"][0]


def test_resized_file_reports_energy_and_header(env) -> None:
    """Resized to rank 2 the file's modules have rank 2, the node reports the energy kept (< 100 %), the output
    moves toward the mix but not exactly, and the header names the base model, trigger and rank."""
    from safetensors import safe_open

    out = _save(env, "ComfyUI", rank=2, prefix="small")
    path = env["loras"] / out.result[0]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_A.weight")}
    assert ranks == {2}
    assert meta["modelspec.trigger_phrase"] == "TOKSTYLE" and meta["ss_network_dim"] == "2"
    assert meta["modelspec.architecture"].startswith("flux-2-klein") and 0 < float(meta["klein_lab.energy_kept"]) < 1
    assert "energy kept" in out.ui["text"][0]


def test_prefix_cannot_leave_the_loras_folder(env) -> None:
    """A filename prefix with '..' is refused naming it; nothing is written outside the loras folder."""
    from klein_lora_lab.trainer_core.files.safe_paths import UnsafePathError

    with pytest.raises(UnsafePathError, match=r"\.\."):
        _save(env, "ComfyUI", prefix="../../escape")
    assert not list(env["loras"].parent.glob("escape*"))
