"""Training and forward-time LoRAs under ComfyUI's dynamic VRAM (comfy-aimdo), in a process of its own.

Run by tests/gpu/test_dynamic_vram_gpu.py as `python tests/gpu/dynamic_vram_probe.py OUT_DIR`; prints one JSON
line with what it measured, or {"skip": reason}. It starts as ComfyUI's main.py does: comfy-aimdo's library is
loaded before torch (it must be in place before CUDA is), then ComfyUI is imported, the devices are handed to
comfy-aimdo and `ModelPatcherDynamic` becomes the patcher every loader makes. The tiny Klein is then loaded
through 'Load Diffusion Model's path both with and without dynamic VRAM, and the same work is done on each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load_aimdo():
    """comfy-aimdo's control module with its library loaded (as main.py does, before torch), or None."""
    try:
        import comfy_aimdo.control as aimdo
    except ImportError:
        return None
    try:
        aimdo.init(simple_vram_headroom=None)
    except TypeError:  # comfy-aimdo 0.4.9's protocol, as main.py handles it
        aimdo.init()
    return aimdo


def _enable_dynamic_vram(aimdo) -> str | None:
    """Hand the GPUs to comfy-aimdo and make ModelPatcherDynamic the default patcher; the reason if it cannot."""
    import comfy.cli_args
    import comfy.model_management as mm

    if aimdo is None:
        return "dynamic VRAM needs comfy-aimdo (pip install comfy-aimdo)"
    devices = mm.get_all_torch_devices()
    try:
        ready = aimdo.init_devices((d.index, int(comfy.cli_args.args.vram_headroom * 1024**3)) for d in devices)
    except TypeError:
        ready = aimdo.init_devices(d.index for d in devices)
    if not ready:
        return f"comfy-aimdo did not initialise on this GPU (library loaded: {aimdo.lib is not None})"
    _set_dynamic(True)
    return None


def _set_dynamic(on: bool) -> None:
    import comfy.memory_management
    import comfy.model_patcher

    comfy.model_patcher.CoreModelPatcher = (
        comfy.model_patcher.ModelPatcherDynamic if on else comfy.model_patcher.ModelPatcher
    )
    comfy.memory_management.aimdo_enabled = on


def _train(patcher, out: Path, items) -> list[float]:
    import torch
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    settings = TrainSettings(rank=4, alpha=4, steps=3, checkpoint_every=0, sample_every=0)
    run = RunFolder.create(out, settings, {})
    with torch.inference_mode():
        outcome = train_in_comfy(patcher, items, settings, run, False, None, None, None)
    assert outcome.result.steps_done == 3, outcome.result
    return [r["loss"] for r in run.read_metrics()]


def _lora_file(model, path: Path, dora: bool) -> None:
    """A random rank-4 LoRA on every block Linear of `model`, in the diffusion_model.* PEFT key style core reads
    for Flux2 (with a `dora_scale` per module when `dora`)."""
    import torch
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


def _loaders(patcher, loras: Path) -> dict:
    """Base, the pack's block loader and core's LoraLoader predictions for the plain and the DoRA file."""
    import comfy.sd
    from harness.predict import predict
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from safetensors.torch import load_file

    ctx = patcher.model.diffusion_model.txt_in.weight.shape[1]
    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    out = {"base": predict(patcher, ctx)}
    for kind in ("lora", "dora"):
        name = f"dyn_{kind}.safetensors"
        if not (loras / name).exists():
            _lora_file(patcher.model.diffusion_model, loras / name, kind == "dora")
        ours = KleinLabLoraLoaderBlocks.execute(patcher, name, 1.0, "all", 1.0, "", **groups)[0]
        core = comfy.sd.load_lora_for_models(patcher, None, load_file(str(loras / name)), 1.0, 0.0)[0]
        out[f"ours {kind}"], out[f"core {kind}"] = predict(ours, ctx), predict(core, ctx)
    return out


_PAIRS = tuple(f"{kind}, {mode}" for kind in ("lora", "dora") for mode in ("dynamic", "plain"))


def main(out_dir: Path) -> dict:
    aimdo = _load_aimdo()  # before torch, as main.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness.pack import register_pack

    register_pack()
    import torch

    if not torch.cuda.is_available():
        return {"skip": "needs an NVIDIA GPU"}
    from harness.comfy_env import import_comfy_for_cuda

    why_not = import_comfy_for_cuda()
    if why_not is not None:
        return {"skip": why_not}
    why_not = _enable_dynamic_vram(aimdo)
    if why_not is not None:
        return {"skip": why_not}

    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    from harness.fixtures import tiny_klein_path
    from klein_lora_lab.nodes.comfy.model_env import is_dynamic
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from klein_lora_lab.trainer_core.training.data import TrainItem

    folder_paths.set_output_directory(str(out_dir / "output"))
    register_runs_folder()
    loras = out_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(loras))
    path = tiny_klein_path(TinySpec(), seed=0)
    result: dict = {}

    dynamic = comfy.sd.load_diffusion_model(str(path))
    result["dynamic patcher"] = is_dynamic(dynamic)
    mm.load_models_gpu([dynamic], force_full_load=True)
    qkv = dynamic.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    result["qkv device after a full load"] = str(qkv.device)
    gen = torch.Generator().manual_seed(2)
    ctx_dim = dynamic.model.diffusion_model.txt_in.weight.shape[1]
    items = [TrainItem(torch.randn(128, 4, 4, generator=gen), torch.randn(3, ctx_dim, generator=gen)) for _ in "ab"]
    result["losses dynamic"] = _train(dynamic, out_dir / "dynamic", items)
    predictions = {f"{k}, dynamic": v for k, v in _loaders(dynamic, loras).items()}
    mm.unload_all_models()

    _set_dynamic(False)
    try:
        plain = comfy.sd.load_diffusion_model(str(path))
        result["plain patcher is dynamic"] = is_dynamic(plain)
        result["losses plain"] = _train(plain, out_dir / "plain", items)
        predictions.update({f"{k}, plain": v for k, v in _loaders(plain, loras).items()})
    finally:
        _set_dynamic(True)
        mm.unload_all_models()
    base = predictions["base, dynamic"]
    result["max |prediction - base, dynamic|"] = {k: (v - base).abs().max().item() for k, v in predictions.items()}
    gap = {k: (predictions[f"ours {k}"] - predictions[f"core {k}"]).abs().max().item() for k in _PAIRS}
    result["max |ours - core|"] = gap
    result["max |dynamic - plain|"] = {
        k: (predictions[f"{k}, dynamic"] - predictions[f"{k}, plain"]).abs().max().item()
        for k in ("base", "ours lora", "ours dora", "core lora", "core dora")
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))), flush=True)
