"""The LoRA file cache answers to ComfyUI's memory management and stays within its byte budget.

ComfyUI runs in-process on the CPU with the tiny Klein loaded by core's UNETLoader; LoRA files are written into
a temporary `loras` folder. On a CPU-only ComfyUI the model's compute device is the CPU, so the cache's
"device copies" are CPU tensors: what is checked is that they are dropped (and rebuilt on the next use).
"""

from __future__ import annotations

import pytest
import torch
from klein_lora_lab.trainer_core.lora.lora_formats import write_peft


def _lora(shape, seed: int, rank: int = 4) -> dict:
    from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
    from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes
    from klein_lora_lab.trainer_core.model.block_weights import block_of

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_out, fan_in) in sorted(klein_linear_shapes(shape).items()):
        if block_of(name) is not None:
            out[name] = LoraWeights(
                torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5,
                torch.randn(fan_out, rank, generator=gen) * 0.08,
                alpha=float(rank),
            )
    return out


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, tmp_path_factory):
    """The tiny Klein loaded by UNETLoader and three LoRA files of the same size in a loras folder."""
    import folder_paths
    from klein_lora_lab.trainer_core.model.klein import read_shape
    from safetensors.torch import save_file

    import nodes

    loras = tmp_path_factory.mktemp("cache_loras")
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("loras", str(loras))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    shape = read_shape(model.model.diffusion_model)
    for i in range(3):
        save_file(write_peft(_lora(shape, seed=30 + i)), str(loras / f"cache_{i}.safetensors"))
    return {"model": model, "shape": shape, "loras": loras}


def _predict(patcher, context_dim: int) -> torch.Tensor:
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.randn(1, 6, context_dim, generator=gen)
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, transformer_options=options)


def test_comfyui_unloading_models_drops_the_cached_lora_tensors(env) -> None:
    """After LoRAs were applied and sampled (cache filled, dtype copies placed, the wrapper's fused stack built),
    ComfyUI's unload_all_models (what /free and the out-of-memory recovery call) leaves no cached LoRA tensor:
    no entry, no tensor in the released file objects, none in the wrapper. The same MODEL then renders exactly
    as before (the file is read again). The hook is installed once however often the pack loads."""
    import comfy.model_management as mm
    from klein_lora_lab.nodes.comfy.forward_loras import StackItem, apply_items, forward_loras_of
    from klein_lora_lab.nodes.comfy.lora_cache import LORA_FILES, install_memory_hook

    install_memory_hook()
    wrapped = mm.free_memory
    install_memory_hook()
    assert mm.free_memory is wrapped and wrapped.klein_lab_original is not None

    LORA_FILES.clear()
    items = [StackItem("cache_0.safetensors", 0.7), StackItem("cache_1.safetensors", -0.5)]
    patched, _report = apply_items(env["model"], items)
    before = _predict(patched, env["shape"].context_dim)
    wrapper = forward_loras_of(patched)
    loaded = [spec.lora for spec in wrapper.specs]
    assert len(LORA_FILES) == 2 and LORA_FILES.nbytes() > 0
    assert wrapper._stacks and all(entry.nbytes() > 0 and entry._placed for entry in loaded)

    mm.unload_all_models()

    assert len(LORA_FILES) == 0 and LORA_FILES.nbytes() == 0
    assert all(entry.nbytes() == 0 and entry._read is None and not entry._placed for entry in loaded)
    assert not wrapper._stacks and not wrapper._fused
    torch.testing.assert_close(_predict(patched, env["shape"].context_dim), before, rtol=0, atol=0)


def test_cache_stays_within_its_byte_budget(env) -> None:
    """With a budget for two files, reading a third drops the least recently used one (its tensors freed), the
    cache never holds more bytes than its budget, a re-used file stays, and a dtype copy counts against the
    budget too (the entry that just placed it counts as in use and stays)."""
    from klein_lora_lab.nodes.comfy.lora_cache import LoraCache

    shape = env["shape"]
    paths = [env["loras"] / f"cache_{i}.safetensors" for i in range(3)]
    one = LoraCache().get(paths[0], shape).nbytes()
    cache = LoraCache(max_bytes=int(2.25 * one))
    first, second = cache.get(paths[0], shape), cache.get(paths[1], shape)
    assert cache.get(paths[0], shape) is first  # used again: now the most recent
    third = cache.get(paths[2], shape)
    assert len(cache) == 2 and cache.nbytes() <= cache.max_bytes
    assert second.nbytes() == 0 and cache.get(paths[0], shape) is first and cache.get(paths[2], shape) is third
    third.placed(torch.device("cpu"), torch.float16)  # +half a file: over budget, the older entry goes
    assert len(cache) == 1 and cache.nbytes() <= cache.max_bytes and first.nbytes() == 0

    again = LoraCache(max_bytes=int(2.25 * one))
    old, new = again.get(paths[0], shape), again.get(paths[1], shape)
    copy = old.placed(torch.device("cpu"), torch.float16)  # the entry that grows is in use: the other one goes
    assert (
        len(again) == 1
        and new.nbytes() == 0
        and old.nbytes() > 0
        and copy["double_blocks.0.img_attn.qkv"].down.dtype == torch.float16
    )


def test_pack_load_registers_runs_folder_and_memory_hook_once(comfy_root) -> None:
    """The extension's on_load (what ComfyUI calls before listing the nodes) puts the runs folder into the loras
    search paths and wraps ComfyUI's free_memory; loading twice changes nothing more."""
    import asyncio

    import comfy.model_management as mm
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import runs_dir
    from klein_lora_lab.nodes.extension import KleinLabExtension

    asyncio.run(KleinLabExtension().on_load())
    hook = mm.free_memory
    asyncio.run(KleinLabExtension().on_load())
    assert mm.free_memory is hook and hook.klein_lab_original is not None
    assert getattr(hook.klein_lab_original, "klein_lab_original", None) is None  # wrapped once, not twice
    assert folder_paths.get_folder_paths("loras").count(str(runs_dir())) == 1
    assert runs_dir().is_dir()
