"""Forward-time LoRAs through real ComfyUI: equal to core's merged LoraLoader, stackable, no re-patching, fp8.

The tiny Klein is loaded by core's UNETLoader; LoRA files in our, kohya and diffusers key styles are written by
our writers into a temporary `loras` folder. Predictions go through `BaseModel.apply_model` with the patcher's
wrappers in `transformer_options` (as ComfyUI's sampler passes them) and through a real KSampler run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

STYLES = ("ours", "kohya", "diffusers")
# ComfyUI maps these diffusers names for Flux2; its key map has no diffusers names for Klein's time embedder
# and global modulations (we read them, core does not), so LoRAs compared with core leave those out.
CORE_DIFFUSERS_GLOBALS = ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")


def _random_lora(shape, seed: int, globals_: tuple[str, ...], rank: int = 4, scale: float = 0.08) -> dict:
    from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
    from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes
    from klein_lora_lab.trainer_core.model.block_weights import block_of

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_out, fan_in) in sorted(klein_linear_shapes(shape).items()):
        if block_of(name) is None and name not in globals_:
            continue
        down = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
        out[name] = LoraWeights(down, torch.randn(fan_out, rank, generator=gen) * scale, alpha=rank * 2.0)
    return out


def _write(weights: dict, style: str, path: Path) -> dict[str, torch.Tensor]:
    from klein_lora_lab.trainer_core.lora.lora_formats import write_diffusers, write_kohya, write_peft
    from safetensors.torch import save_file

    sd = {"ours": write_peft, "kohya": write_kohya, "diffusers": write_diffusers}[style](weights)
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, tmp_path_factory):
    """ComfyUI in-process, the tiny Klein loaded by UNETLoader, LoRA files of every style in a loras folder."""
    import folder_paths
    from klein_lora_lab.trainer_core.model.klein import read_shape

    import nodes

    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("loras", str(loras))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    shape = read_shape(model.model.diffusion_model)
    files = {}
    for i, style in enumerate(STYLES):
        weights = _random_lora(shape, seed=10 + i, globals_=CORE_DIFFUSERS_GLOBALS)
        files[style] = _write(weights, style, loras / f"lora_{style}.safetensors")
    return {"nodes": nodes, "model": model, "shape": shape, "loras": loras, "files": files}


def _inputs(context_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.7]), torch.randn(1, 6, context_dim, generator=gen)


def predict(patcher, context_dim: int) -> torch.Tensor:
    """The model's prediction as ComfyUI's sampler computes it (patcher loaded, its wrappers in effect)."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    x, sigma, ctx = _inputs(context_dim)
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options).float()


def core_merged(model, *loras: tuple[dict, float]):
    """Core's stock LoraLoader path: load_lora_for_models once per LoRA (weights merged on load)."""
    import comfy.sd

    for sd, strength in loras:
        model, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)
    return model


def loader(model, name: str, strength: float, preset: str = "all", vector: str = "", global_strength: float = 1.0):
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks

    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    return KleinLabLoraLoaderBlocks.execute(model, name, strength, preset, global_strength, vector, **groups)


@pytest.fixture(params=["output side", "weight side"])
def side(request, monkeypatch) -> str:
    """Force where the LoRA is added (into each Linear's output, or into a temporary weight) for this test."""
    from klein_lora_lab.nodes.comfy import forward_loras as comfy_adapters

    monkeypatch.setattr(
        comfy_adapters, "WEIGHT_SIDE_TOKENS_PER_IN", float("inf") if request.param == "output side" else 0.0
    )
    return request.param


@pytest.mark.parametrize("style", STYLES)
def test_forward_time_equals_core_merged(env, style: str, side: str) -> None:
    """For each key style and either application side, our forward-time loader equals core's merged
    LoraLoader at the same strength."""
    ctx_dim = env["shape"].context_dim
    base = predict(env["model"], ctx_dim)
    (ours,) = loader(env["model"], f"lora_{style}.safetensors", 0.8).result
    got = predict(ours, ctx_dim)
    want = predict(core_merged(env["model"], (env["files"][style], 0.8)), ctx_dim)
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # within bf16 tolerance (fp32 here: far tighter)
    assert (got - want).abs().max() < 1e-4


def test_two_stacked_loras_equal_core_merging_both(env, side: str) -> None:
    """Mixer slots, Stack -> Mixer and two chained loaders all equal core merging both LoRAs (one negative)."""
    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer
    from klein_lora_lab.nodes.loras.lora_stack import KleinLabLoraStack

    ctx_dim = env["shape"].context_dim
    a, b = "lora_kohya.safetensors", "lora_diffusers.safetensors"
    want = predict(core_merged(env["model"], (env["files"]["kohya"], 0.7), (env["files"]["diffusers"], -0.5)), ctx_dim)
    empty = {f"{k}_{i}": v for i in range(1, 5) for k, v in EMPTY_SLOT}
    slots = {**empty, "lora_1": a, "scale_1": 0.7, "lora_3": b, "scale_3": -0.5}
    (mixed,) = KleinLabLoraMixer.execute(env["model"], **slots).result
    (stack,) = KleinLabLoraStack.execute(True, a, 0.7, "all").result
    (stack,) = KleinLabLoraStack.execute(True, b, -0.5, "all", lora_stack=stack).result
    (from_stack,) = KleinLabLoraMixer.execute(env["model"], lora_stack=stack, **empty).result
    (first,) = loader(env["model"], a, 0.7).result
    (chained,) = loader(first, b, -0.5).result
    for patched in (mixed, from_stack, chained):
        torch.testing.assert_close(predict(patched, ctx_dim), want, rtol=1e-4, atol=1e-4)


EMPTY_SLOT = (("on", True), ("lora", "None"), ("scale", 1.0), ("preset", "all"))


def test_mixer_toggles_and_stack_switches(env) -> None:
    """A mixer slot switched off, and a Stack node switched off, leave their LoRA out (equal to core merging only
    the others) while keeping their settings; a chain of Stack nodes adds any number of LoRAs."""
    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer
    from klein_lora_lab.nodes.loras.lora_stack import KleinLabLoraStack

    ctx_dim = env["shape"].context_dim
    a, b, c = "lora_kohya.safetensors", "lora_diffusers.safetensors", "lora_ours.safetensors"
    empty = {f"{k}_{i}": v for i in range(1, 5) for k, v in EMPTY_SLOT}
    slots = {**empty, "lora_1": a, "scale_1": 0.7, "lora_2": b, "scale_2": -0.5, "on_2": False}
    (stack,) = KleinLabLoraStack.execute(False, c, 0.9, "all").result
    assert stack == ()
    (stack,) = KleinLabLoraStack.execute(True, c, 0.4, "all", lora_stack=stack).result
    (stack,) = KleinLabLoraStack.execute(False, b, 1.0, "all", lora_stack=stack).result
    (mixed,) = KleinLabLoraMixer.execute(env["model"], lora_stack=stack, **slots).result
    want = predict(core_merged(env["model"], (env["files"]["kohya"], 0.7), (env["files"]["ours"], 0.4)), ctx_dim)
    torch.testing.assert_close(predict(mixed, ctx_dim), want, rtol=1e-4, atol=1e-4)


def test_mixer_added_rows_apply_like_slots(env) -> None:
    """Rows added with '+ Add LoRA' (the more_loras text) apply like slots, after them: one slot plus two rows, one
    of them off, equal core merging the slot's LoRA and the row that is on; a bad text is refused by row."""
    import json

    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer

    ctx_dim = env["shape"].context_dim
    a, b, c = "lora_kohya.safetensors", "lora_diffusers.safetensors", "lora_ours.safetensors"
    empty = {f"{k}_{i}": v for i in range(1, 5) for k, v in EMPTY_SLOT}
    rows = [{"on": True, "lora": c, "scale": 0.4, "preset": "all"}, {"on": False, "lora": b, "scale": 1.0}]
    slots = {**empty, "lora_1": a, "scale_1": 0.7}
    out = KleinLabLoraMixer.execute(env["model"], more_loras=json.dumps(rows), **slots)
    want = predict(core_merged(env["model"], (env["files"]["kohya"], 0.7), (env["files"]["ours"], 0.4)), ctx_dim)
    torch.testing.assert_close(predict(out.result[0], ctx_dim), want, rtol=1e-4, atol=1e-4)
    lines = out.ui["text"][0].splitlines()
    assert [line.split(" @ ")[0] for line in lines] == [a, c]
    with pytest.raises(ValueError, match="more_loras row 1: preset 'custom' needs its blocks"):
        KleinLabLoraMixer.execute(env["model"], more_loras='[{"lora": "x", "preset": "custom"}]', **slots)


def test_mixer_row_blocks_equal_the_loader_with_the_same_blocks(env) -> None:
    """A row with preset 'custom' and its own per-block vector (1 on the texture blocks, 0 elsewhere) gives the
    model the loader gives with preset 'texture'; the mixer's ui sends the model's block map and what it loaded."""
    import json

    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer
    from klein_lora_lab.trainer_core.model.variants import block_layout

    shape, ctx_dim = env["shape"], env["shape"].context_dim
    layout = block_layout(shape.double_blocks, shape.single_blocks)
    vector = ", ".join("1" if i in layout["groups"]["texture"] else "0" for i in range(len(layout["names"])))
    rows = [{"lora": "lora_ours.safetensors", "scale": 0.8, "preset": "custom", "blocks": vector}]
    empty = {f"{k}_{i}": v for i in range(1, 5) for k, v in EMPTY_SLOT}
    out = KleinLabLoraMixer.execute(env["model"], more_loras=json.dumps(rows), **empty)
    (want,) = loader(env["model"], "lora_ours.safetensors", 0.8, "texture").result
    torch.testing.assert_close(predict(out.result[0], ctx_dim), predict(want, ctx_dim), rtol=1e-5, atol=1e-5)
    (sent,) = out.ui["klein_blocks"]
    assert sent["layout"]["names"] == layout["names"] and [x["lora"] for x in sent["loaded"]] == [rows[0]["lora"]]


def test_block_preset_equals_core_merging_only_those_blocks(env) -> None:
    """Preset 'texture' equals core merging only the texture blocks' keys (absolute block indices)."""
    from klein_lora_lab.trainer_core.model.block_weights import block_of
    from klein_lora_lab.trainer_core.model.variants import block_groups

    texture = set(block_groups(env["shape"])["texture"])
    sd = {k: v for k, v in env["files"]["ours"].items() if block_of(k.removeprefix("diffusion_model.")) in texture}
    ctx_dim = env["shape"].context_dim
    (ours,) = loader(env["model"], "lora_ours.safetensors", 1.3, preset="texture", global_strength=0.0).result
    torch.testing.assert_close(
        predict(ours, ctx_dim), predict(core_merged(env["model"], (sd, 1.3)), ctx_dim), rtol=1e-4, atol=1e-4
    )


def test_strength_change_never_repatches_weights(env, monkeypatch) -> None:
    """A new strength changes the output, but the clone has no weight patches, load_models_gpu patches no weight,
    the base weights stay bit-identical and the MODEL the node received is left without our wrapper."""
    import comfy.model_patcher
    from klein_lora_lab.nodes.comfy.forward_loras import WRAPPER_KEY

    ctx_dim = env["shape"].context_dim
    model = env["model"]
    (first,) = loader(model, "lora_ours.safetensors", 0.8).result
    out1 = predict(first, ctx_dim)  # first load may restore weights patched by an earlier core-merged model
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.model.diffusion_model.state_dict().items()}
    calls = []
    original = comfy.model_patcher.ModelPatcher.patch_weight_to_device
    monkeypatch.setattr(
        comfy.model_patcher.ModelPatcher,
        "patch_weight_to_device",
        lambda self, *a, **k: (calls.append(a), original(self, *a, **k))[1],
    )
    (second,) = loader(model, "lora_ours.safetensors", -1.2, preset="identity").result
    out2 = predict(second, ctx_dim)
    assert (out1 - out2).abs().max() > 1e-3
    assert second.patches == {} and calls == []
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) and ptrs[k] == after[k].data_ptr() for k in before)
    assert not any(WRAPPER_KEY in w for w in model.wrappers.values())


def test_ksampler_run_equals_core_merged(env) -> None:
    """A 3-step KSampler run with a fixed seed: forward-time LoRA equals core's merged LoRA (and differs from base)."""
    nodes = env["nodes"]
    ctx_dim = env["shape"].context_dim
    gen = torch.Generator().manual_seed(3)
    pos, neg = [[torch.randn(1, 6, ctx_dim, generator=gen), {}]], [[torch.zeros(1, 6, ctx_dim), {}]]
    latent = {"samples": torch.zeros(1, 128, 4, 4)}

    def sample(model) -> torch.Tensor:
        return nodes.common_ksampler(model, 42, 3, 2.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    (ours,) = loader(env["model"], "lora_kohya.safetensors", 1.0).result
    got = sample(ours)
    want = sample(core_merged(env["model"], (env["files"]["kohya"], 1.0)))
    base = sample(env["model"])
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", ["unlimited", "none", "two modules"])
def test_ksampler_merge_cache_within_budget(env, monkeypatch, budget: str) -> None:
    """Inside a sampler run target Linears are merged once into separate tensors while the budget allows; with
    any budget (all, none, only some modules) the result equals core's merged LoRA, the base weights are
    untouched, the cache holds at most the budget during the run and nothing after it."""
    import comfy.model_management
    from klein_lora_lab.nodes.comfy import forward_loras as comfy_adapters

    nodes = env["nodes"]
    ctx_dim = env["shape"].context_dim
    qkv = env["model"].model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    limit = {"unlimited": 1 << 40, "none": 0, "two modules": 2 * qkv.numel() * qkv.element_size()}[budget]
    monkeypatch.setattr(comfy_adapters, "merge_budget", lambda device: limit)
    seen: list[tuple[int, int]] = []  # (tensors cached, bytes cached) after each lookup
    merged = comfy_adapters.MergeCache.merged

    def spy(cache, name, module, lora):
        out = merged(cache, name, module, lora)
        seen.append((len(cache.tensors), sum(t.numel() * t.element_size() for t in cache.tensors.values())))
        return out

    monkeypatch.setattr(comfy_adapters.MergeCache, "merged", spy)
    gen = torch.Generator().manual_seed(3)
    pos, neg = [[torch.randn(1, 6, ctx_dim, generator=gen), {}]], [[torch.zeros(1, 6, ctx_dim), {}]]
    latent = {"samples": torch.zeros(1, 128, 4, 4)}
    comfy.model_management.load_models_gpu([env["model"]])  # undoes a merge an earlier core run left patched
    before = {k: v.clone() for k, v in env["model"].model.diffusion_model.state_dict().items()}

    def sample(model) -> torch.Tensor:
        return nodes.common_ksampler(model, 42, 3, 2.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    (ours,) = loader(env["model"], "lora_ours.safetensors", 0.9).result
    got = sample(ours)
    after = env["model"].model.diffusion_model.state_dict()  # before core's merge patches the shared weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    want = sample(core_merged(env["model"], (env["files"]["ours"], 0.9)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    targets = len(env["files"]["ours"]) // 3  # down, up, alpha per module
    count, size = max(seen)
    assert size <= limit
    assert {"unlimited": count == targets, "none": count == 0, "two modules": 2 <= count < targets}[budget]
    assert comfy_adapters.forward_loras_of(ours)._cache is None  # freed when the sampler run ended


def test_fp8_base_weights(env, tiny_model_file, tmp_path, side: str) -> None:
    """With fp8 base weights (ComfyUI's manual-cast Linear), our delta is added in the compute dtype: the result
    equals core merging the LoRA into an fp32 model holding exactly the fp8 weights' values."""
    import comfy.sd
    from safetensors.torch import save_file

    m8 = comfy.sd.load_diffusion_model(str(tiny_model_file), model_options={"dtype": torch.float8_e4m3fn})
    assert m8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    dequantized = tmp_path / "dequantized.safetensors"
    save_file({k: v.float().contiguous() for k, v in m8.model.diffusion_model.state_dict().items()}, str(dequantized))
    m32 = comfy.sd.load_diffusion_model(str(dequantized))
    ctx_dim = env["shape"].context_dim
    (ours,) = loader(m8, "lora_ours.safetensors", 0.9).result
    got = predict(ours, ctx_dim)
    want = predict(core_merged(m32, (env["files"]["ours"], 0.9)), ctx_dim)
    assert (got - predict(m8, ctx_dim)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unmatched_keys_on_node_and_in_log(env, caplog) -> None:
    """Keys that fit no module are shown on the node's UI text and logged as a warning."""
    from safetensors.torch import save_file

    sd = dict(env["files"]["ours"])
    sd["diffusion_model.double_blocks.0.img_attn.norm.key_norm.lora_A.weight"] = torch.zeros(2, 128)
    sd["diffusion_model.double_blocks.0.img_attn.norm.key_norm.lora_B.weight"] = torch.zeros(128, 2)
    save_file(sd, str(env["loras"] / "with_extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="klein_lora_lab"):
        out = loader(env["model"], "with_extra.safetensors", 1.0)
    text = out.ui["text"][0]
    assert "2 keys NOT loaded" in text and "norm.key_norm.lora_A.weight" in text
    assert "norm.key_norm.lora_B.weight" in caplog.text


def test_foreign_lora_is_refused_by_the_node(env) -> None:
    """A LoRA for a bigger Klein (more blocks) is refused through the node, naming the file and the blocks."""
    from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError
    from klein_lora_lab.trainer_core.model.klein import KleinShape

    s = env["shape"]
    bigger = KleinShape(s.hidden, s.heads, s.double_blocks + 3, s.single_blocks + 4, s.context_dim)
    weights = {k: v for k, v in _random_lora(bigger, 1, ()).items() if k.startswith("single_blocks.9.")}
    _write(weights, "ours", env["loras"] / "bigger.safetensors")
    with pytest.raises(LoraFormatError, match=r"bigger\.safetensors: .*single_blocks\.9"):
        loader(env["model"], "bigger.safetensors", 1.0)


def test_example_workflow_matches_the_nodes(comfy_root) -> None:
    """The shipped block-LoRA/mixer workflow lists our nodes' inputs in schema order, one value per widget (valid
    preset choices), and links whose two ends agree on ids and types (what the frontend needs to load it)."""
    import json

    from comfy_api.latest import io
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from klein_lora_lab.nodes.loras.lora_mixer import KleinLabLoraMixer
    from klein_lora_lab.nodes.loras.lora_stack import KleinLabLoraStack

    ours = {cls.__name__: cls for cls in (KleinLabLoraLoaderBlocks, KleinLabLoraMixer, KleinLabLoraStack)}
    path = Path(__file__).parents[2] / "workflows" / "Klein 07 - Block strengths with a LoRA mixer.json"
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert set(ours) <= {n["type"] for n in workflow["nodes"]}
    widget_kinds = (io.Combo.Input, io.Float.Input, io.Int.Input, io.String.Input, io.Boolean.Input)
    for node in workflow["nodes"]:
        if node["type"] not in ours:
            continue
        inputs = ours[node["type"]].define_schema().inputs
        assert [i["name"] for i in node["inputs"]] == [i.id for i in inputs], node["type"]
        widgets = [i for i in inputs if isinstance(i, widget_kinds)]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for inp, value in zip(widgets, node["widgets_values"], strict=True):
            if isinstance(inp, io.Combo.Input) and inp.id.startswith("preset"):
                assert value in inp.options, (node["type"], inp.id, value)
            if isinstance(inp, io.Float.Input):
                assert inp.min <= value <= inp.max, (node["type"], inp.id, value)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] == kind == by_id[src]["outputs"][src_slot]["type"]


def test_weight_side_only_for_plain_linears(env, tiny_model_file) -> None:
    """A loaded fp32 model's Linears qualify for the weight side (ComfyUI's forward is F.linear there); fp8
    (manual-cast) Linears and a wrong compute dtype do not, so they keep ComfyUI's casting forward."""
    import comfy.model_management
    import comfy.sd
    from klein_lora_lab.nodes.comfy.forward_loras import _plain_linear

    comfy.model_management.load_models_gpu([env["model"]])
    qkv = env["model"].model.diffusion_model.double_blocks[0].img_attn.qkv
    x = torch.zeros(2, qkv.in_features)
    assert _plain_linear(qkv, x)
    assert not _plain_linear(qkv, x.bfloat16())
    m8 = comfy.sd.load_diffusion_model(str(tiny_model_file), model_options={"dtype": torch.float8_e4m3fn})
    comfy.model_management.load_models_gpu([m8])
    assert not _plain_linear(m8.model.diffusion_model.double_blocks[0].img_attn.qkv, x)


def test_same_file_is_read_once_until_it_changes(env) -> None:
    """A LoRA file is read once per (path, mtime, size): the second load is the cached object; a rewritten file
    (a new checkpoint under the same name) is read again."""
    import os

    from klein_lora_lab.nodes.comfy.lora_cache import load_lora_cached

    path = env["loras"] / "cached.safetensors"
    _write(_random_lora(env["shape"], 3, ()), "ours", path)
    first = load_lora_cached(path, env["shape"])
    assert load_lora_cached(path, env["shape"]) is first
    _write(_random_lora(env["shape"], 4, ()), "ours", path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    second = load_lora_cached(path, env["shape"])
    assert second is not first
    name = "double_blocks.0.img_attn.qkv"
    assert not torch.equal(second.weights[name].down, first.weights[name].down)
