"""Training under ComfyUI's dynamic VRAM (comfy-aimdo), the default of a `main.py` server on an NVIDIA GPU.

Turns dynamic VRAM on in this process the way ComfyUI's main.py does, loads the tiny Klein through ComfyUI's
'Load Diffusion Model' path (a `ModelPatcherDynamic`), and locks in: a "full" load leaves the large Linears'
weights off the GPU (why the pack cannot train on that patcher), and the Train node's path trains it anyway,
on ComfyUI's non-dynamic clone, to the same losses as the same file loaded without dynamic VRAM.
Run on its own (`pytest tests/gpu/test_dynamic_vram_gpu.py -s`): dynamic VRAM is set up before the first CUDA use.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def dynamic_comfy():
    """ComfyUI imported for the GPU with dynamic VRAM turned on as main.py turns it on."""
    from harness.comfy_env import import_comfy_for_cuda

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    why_not = import_comfy_for_cuda()
    if why_not is not None:
        pytest.skip(why_not)
    import comfy.cli_args

    aimdo = pytest.importorskip("comfy_aimdo.control", reason="dynamic VRAM needs comfy-aimdo")
    try:
        aimdo.init(simple_vram_headroom=None)
    except TypeError:  # comfy-aimdo 0.4.9's protocol, as main.py handles it
        aimdo.init()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    devices = mm.get_all_torch_devices()
    try:
        ready = aimdo.init_devices((d.index, int(comfy.cli_args.args.vram_headroom * 1024**3)) for d in devices)
    except TypeError:
        ready = aimdo.init_devices(d.index for d in devices)
    if not ready:
        pytest.skip("comfy-aimdo did not initialise on this GPU")
    plain = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    yield mm
    comfy.model_patcher.CoreModelPatcher = plain
    comfy.memory_management.aimdo_enabled = False


def _train(patcher, out: Path, items) -> list[float]:
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    settings = TrainSettings(rank=4, alpha=4, steps=3, checkpoint_every=0, sample_every=0)
    run = RunFolder.create(out, settings, {})
    with torch.inference_mode():
        outcome = train_in_comfy(patcher, items, settings, run, False, None, None, None)
    assert outcome.result.steps_done == 3
    return [r["loss"] for r in run.read_metrics()]


def test_a_dynamic_vram_model_trains_as_the_plain_one(dynamic_comfy, tmp_path: Path) -> None:
    """The dynamic MODEL's "full" load leaves a block Linear's weight off the GPU; train_in_comfy trains it on the
    GPU with finite losses equal (within GPU reduction noise) to the same file loaded without dynamic VRAM."""
    import comfy.memory_management
    import comfy.model_patcher
    import comfy.sd
    import folder_paths
    from harness.fixtures import tiny_klein_path
    from klein_lora_lab.nodes.comfy.model_env import is_dynamic
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from klein_lora_lab.trainer_core.training.data import TrainItem

    mm = dynamic_comfy
    folder_paths.set_output_directory(str(tmp_path / "output"))
    register_runs_folder()
    path = tiny_klein_path(TinySpec(), seed=0)
    dynamic = comfy.sd.load_diffusion_model(str(path))
    assert is_dynamic(dynamic)
    mm.load_models_gpu([dynamic], force_full_load=True)
    qkv = dynamic.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    size = qkv.numel() * qkv.element_size()
    print(f"\n[dynamic VRAM] after a full load, a block qkv weight ({size} bytes) is on {qkv.device}")
    assert qkv.device.type != "cuda"

    gen = torch.Generator().manual_seed(2)
    ctx_dim = dynamic.model.diffusion_model.txt_in.weight.shape[1]
    items = [TrainItem(torch.randn(128, 4, 4, generator=gen), torch.randn(3, ctx_dim, generator=gen)) for _ in "ab"]
    got = _train(dynamic, tmp_path / "dynamic", items)
    mm.unload_all_models()

    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcher
    comfy.memory_management.aimdo_enabled = False
    try:
        plain = comfy.sd.load_diffusion_model(str(path))
        assert not is_dynamic(plain)
        want = _train(plain, tmp_path / "plain", items)
    finally:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        mm.unload_all_models()
    print(f"[dynamic VRAM] losses {got} (plain load: {want})")
    assert all(math.isfinite(x) for x in got)
    assert got == pytest.approx(want, rel=1e-3)


def _lora_file(model, path: Path, dora: bool) -> None:
    """A random rank-4 LoRA on every block Linear of `model`, in the diffusion_model.* PEFT key style core reads
    for Flux2 (with a `dora_scale` per module when `dora`)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            out_f, in_f = module.weight.shape
            key = f"diffusion_model.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) * 0.2
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen) * 0.2
            if dora:
                sd[f"{key}.dora_scale"] = 1 + 0.1 * torch.rand(out_f, 1, generator=gen)
    save_file(sd, str(path))


def _predict_on_gpu(patcher, context_dim: int) -> torch.Tensor:
    """The prediction at a fixed input as ComfyUI's sampler computes it, on the patcher's load device."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(7)
    device = patcher.load_device
    x = torch.randn(1, 128, 4, 4, generator=gen).to(device)
    ctx = torch.randn(1, 6, context_dim, generator=gen).to(device)
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad():
        sigma = torch.tensor([0.7], device=device)
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options).float().cpu()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_loaders_under_dynamic_vram_match_the_plain_model(dynamic_comfy, tmp_path: Path, dora: bool) -> None:
    """The pack's block loader (forward-time LoRAs, what the mixer and scrub nodes use too) on a dynamic-VRAM
    MODEL gives the prediction it gives on the plain MODEL and core's LoraLoader gives on the dynamic one: the
    LoRA is applied (the prediction moves) although the base weights live off the GPU between calls."""
    import comfy.memory_management
    import comfy.model_patcher
    import comfy.sd
    import folder_paths
    from harness.fixtures import tiny_klein_path
    from klein_lora_lab.nodes.comfy.model_env import is_dynamic
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from safetensors.torch import load_file

    mm = dynamic_comfy
    path = tiny_klein_path(TinySpec(), seed=0)
    loras = tmp_path / "loras"
    loras.mkdir()
    folder_paths.add_model_folder_path("loras", str(loras))
    name = f"dyn_{'dora' if dora else 'lora'}.safetensors"
    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}

    def outputs(patcher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = patcher.model.diffusion_model.txt_in.weight.shape[1]
        if not (loras / name).exists():
            _lora_file(patcher.model.diffusion_model, loras / name, dora)
        base = _predict_on_gpu(patcher, ctx)
        ours = _predict_on_gpu(KleinLabLoraLoaderBlocks.execute(patcher, name, 1.0, "all", 1.0, "", **groups)[0], ctx)
        core = comfy.sd.load_lora_for_models(patcher, None, load_file(str(loras / name)), 1.0, 0.0)[0]
        return base, ours, _predict_on_gpu(core, ctx)

    dynamic = comfy.sd.load_diffusion_model(str(path))
    assert is_dynamic(dynamic)
    base_dyn, ours_dyn, core_dyn = outputs(dynamic)
    mm.unload_all_models()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcher
    comfy.memory_management.aimdo_enabled = False
    try:
        plain = comfy.sd.load_diffusion_model(str(path))
        assert not is_dynamic(plain)
        base_plain, ours_plain, _ = outputs(plain)
    finally:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        mm.unload_all_models()
    moved = (core_dyn - base_dyn).abs().max().item()
    gaps = {
        "ours-core (dynamic)": (ours_dyn - core_dyn).abs().max().item(),
        "ours dynamic-plain": (ours_dyn - ours_plain).abs().max().item(),
        "base dynamic-plain": (base_dyn - base_plain).abs().max().item(),
    }
    print(f"\n[dynamic VRAM, {name}] the LoRA moves the prediction by {moved:.3e}; gaps {gaps}")
    assert moved > 1e-2
    assert all(gap < 0.05 * moved for gap in gaps.values()), gaps
