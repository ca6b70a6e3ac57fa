"""rsLoRA, LoKr and DoRA trained on the diffusion model ComfyUI loaded, then loaded back by core's LoraLoader and
by the pack's loader.

Locked in: training leaves ComfyUI's loaded module bit-identical (values, dtypes, flags, module tree); the file
has no key core cannot place; core's merge and the pack's forward-time loader give the prediction of the
trained adapter (DoRA: core divides by the base weight's row norm where PEFT divides by the merged weight's, so
core's figure is printed and bounded, and the pack's must be exact).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import train

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=2, context_dim=32)


def _comfy_model():
    import comfy.model_management
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(
        tiny_klein_state_dict(SPEC, 3), model_options={"dtype": torch.float32}
    )
    comfy.model_management.load_models_gpu([patcher])
    return patcher


def _snapshot(model: torch.nn.Module) -> tuple[dict, list, list]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()]
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    return state, flags, tree


def _velocity(patcher_or_module, x, sigma, ctx, adapters=None) -> torch.Tensor:
    with torch.no_grad():
        if adapters is not None:
            return klein_forward(patcher_or_module, x, sigma, ctx, adapters=adapters)
        return patcher_or_module.model.diffusion_model(x, sigma, context=ctx)


@pytest.mark.parametrize("algorithm", ["rslora", "lokr", "dora"])
def test_trained_on_comfys_model_and_loaded_by_core_and_the_pack(
    comfy_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, algorithm: str
) -> None:
    """Four steps on every Linear of ComfyUI's loaded tiny Klein; its module is bit-identical afterwards; core's
    LoraLoader places every key of the checkpoint; core's merged model and the pack's loader predict what the
    trained adapter predicts (≤ 1e-4, for a change ≥ 1e-3)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from klein_lora_lab.trainer_core.lora.adapter_math import place
    from klein_lora_lab.trainer_core.lora.adapters import AdapterStack
    from klein_lora_lab.trainer_core.lora.lora_formats import read_lora_file
    from klein_lora_lab.trainer_core.model.klein import read_shape

    patcher = _comfy_model()
    module = patcher.model.diffusion_model
    before = _snapshot(module)
    g = torch.Generator().manual_seed(0)
    items = [TrainItem(torch.randn(128, 3, 4, generator=g), torch.randn(5, 32, generator=g)) for _ in range(2)]
    settings = TrainSettings(
        rank=4, alpha=8, learning_rate=2e-2, steps=4, targets="regex:.*", save_dtype="fp32", algorithm=algorithm
    )
    with torch.inference_mode(False):
        result = train(module, items, settings, RunFolder.create(tmp_path / "run", settings, {}))
    after = _snapshot(module)
    assert after[2] == before[2] and after[1] == before[1]
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())

    x, sigma = torch.randn(1, 128, 3, 4, generator=g), torch.tensor([0.7])
    ctx = torch.randn(1, 6, 32, generator=g)
    trained = _velocity(module, x, sigma, ctx, result.lora)
    base = _velocity(module, x, sigma, ctx, AdapterStack())
    read = read_lora_file(result.last_checkpoint, read_shape(module))
    weights = {n: place(a, "cpu", torch.float32, module.get_submodule(n).weight) for n, a in read.weights.items()}
    stack = AdapterStack()
    stack.set_lora("run", weights, 1.0)
    by_pack = _velocity(module, x, sigma, ctx, stack)

    # Last: core merges the LoRA into the very module ComfyUI shares between the clones.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sd = comfy.utils.load_torch_file(str(result.last_checkpoint), safe_load=True)
        core, _ = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(core.patches) == len(result.lora.names)
    comfy.model_management.load_models_gpu([core])
    by_core = _velocity(core, x, sigma, ctx)
    change = (trained - base).abs().max().item()
    core_err, pack_err = (by_core - trained).abs().max().item(), (by_pack - trained).abs().max().item()
    print(f"\n[{algorithm}] change {change:.3g}  |core − trained| {core_err:.3g}  |pack − trained| {pack_err:.3g}")
    assert change > 1e-3
    assert pack_err < 1e-4
    assert core_err < 1e-4
