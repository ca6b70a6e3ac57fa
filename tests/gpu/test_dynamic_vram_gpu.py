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
