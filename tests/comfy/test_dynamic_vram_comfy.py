"""Training a MODEL that runs under ComfyUI's dynamic VRAM (comfy-aimdo), in-process on the CPU with the tiny Klein.

ComfyUI's `ModelPatcherDynamic` cannot be built without a GPU: its constructor allocates comfy-aimdo host buffers,
and comfy-aimdo's library only loads with CUDA. These tests therefore mark a real ModelPatcher, made by ComfyUI's
own loader, as dynamic (`is_dynamic()` returns True): that method is all the pack and ComfyUI's own
`clone(disable_dynamic=True)` look at, so ComfyUI's real non-dynamic clone runs, reloading the file through the
MODEL's loader record. What a dynamic load does on a GPU (weights left in host memory, cast per call) is described
in nodes/comfy/model_env.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

KEY = "diffusion_model.img_in.weight"


@pytest.fixture
def model(comfy_root, tiny_model_file):
    """A fresh MODEL of the tiny Klein as 'Load Diffusion Model' makes it (with its loader record)."""
    import comfy.model_management as mm
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(tiny_model_file))
    yield patcher
    mm.unload_all_models()


def _dynamic(patcher, monkeypatch, calls: list[bool] | None = None):
    """Mark `patcher` as a dynamic VRAM patcher; `calls` records each reload's `disable_dynamic`."""
    monkeypatch.setattr(patcher, "is_dynamic", lambda: True)
    if calls is not None:
        loader, args = patcher.cached_patcher_init[:2]

        def recording_loader(*a, disable_dynamic=False):
            calls.append(disable_dynamic)
            return loader(*a, disable_dynamic=disable_dynamic)

        monkeypatch.setattr(patcher, "cached_patcher_init", (recording_loader, args))
    return patcher


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def test_a_plain_model_trains_on_a_clone_sharing_its_weights(model) -> None:
    """Without dynamic VRAM nothing changes: the run's patcher is a clone over the very same module."""
    from klein_lora_lab.nodes.comfy.model_env import training_patcher

    patcher = training_patcher(model)
    assert patcher is not model and patcher.model is model.model


def test_a_dynamic_model_trains_on_a_plain_reload_with_its_patches(model, monkeypatch) -> None:
    """A dynamic VRAM MODEL is swapped for ComfyUI's non-dynamic clone: its file loaded again by its loader with
    disable_dynamic, a plain ModelPatcher over a separate module with identical weights, carrying the MODEL's
    weight patches, which the full load then applies; the MODEL itself is left as it was."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from klein_lora_lab.nodes.comfy.model_env import is_dynamic, loaded_for_training, training_patcher

    calls: list[bool] = []
    diff = torch.full_like(model.model.diffusion_model.img_in.weight, 0.5)
    model.add_patches({KEY: ("diff", (diff,))}, 1.0)
    dynamic = _dynamic(model, monkeypatch, calls)
    before = _state(dynamic)

    patcher = training_patcher(dynamic)
    assert calls == [True]
    assert type(patcher) is comfy.model_patcher.ModelPatcher and not is_dynamic(patcher)
    assert patcher.model is not dynamic.model
    assert list(patcher.patches) == [KEY]
    fresh = _state(patcher)
    assert all(torch.equal(fresh[k], before[k]) for k in before)

    with loaded_for_training(patcher) as (module, _device):
        assert module is patcher.model.diffusion_model
        expected = (before["img_in.weight"].float() + 0.5).to(module.img_in.weight.dtype)
        assert torch.equal(module.img_in.weight, expected)
    mm.unload_all_models()
    assert is_dynamic(dynamic) and list(dynamic.patches) == [KEY]
    after = _state(dynamic)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_dynamic_model_without_a_loader_record_is_refused_naming_the_fix(model, monkeypatch) -> None:
    """A dynamic VRAM MODEL whose loader kept no record cannot be reloaded as a plain model: the error says to use
    'Load Diffusion Model' or start ComfyUI with --disable-dynamic-vram, and names no internal type."""
    from klein_lora_lab.nodes.comfy.model_env import DynamicVramError, training_patcher

    dynamic = _dynamic(model, monkeypatch)
    monkeypatch.setattr(dynamic, "cached_patcher_init", None)
    with pytest.raises(DynamicVramError, match="--disable-dynamic-vram") as err:
        training_patcher(dynamic)
    assert "Load Diffusion Model" in str(err.value)
    assert type(err.value).__module__ == "builtins"


def test_loaded_for_training_refuses_a_dynamic_patcher_before_loading(model, monkeypatch) -> None:
    """loaded_for_training never trains on a dynamic VRAM patcher (its weights would stay off the device): it
    raises before unloading or loading anything."""
    import comfy.model_management as mm
    from klein_lora_lab.nodes.comfy.model_env import DynamicVramError, loaded_for_training

    mm.load_models_gpu([model], force_full_load=True)
    dynamic = _dynamic(model, monkeypatch)
    with pytest.raises(DynamicVramError, match="training_patcher"), loaded_for_training(dynamic):
        pass
    assert any(m is model for m in mm.loaded_models())


def test_train_in_comfy_trains_a_dynamic_model_as_the_plain_one(model, tmp_path: Path, monkeypatch) -> None:
    """train_in_comfy on a dynamic VRAM MODEL trains the plain reload, not the MODEL's own module: the losses equal
    a run on the same MODEL without dynamic VRAM, and the MODEL's weights are bit-identical afterwards."""
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training import trainer
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    real_forward = trainer.klein_forward
    trained: list[torch.nn.Module] = []

    def forward(*args, **kwargs):
        trained.append(args[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(trainer, "klein_forward", forward)
    register_runs_folder()
    own = model.model.diffusion_model
    gen = torch.Generator().manual_seed(2)
    ctx_dim = own.txt_in.weight.shape[1]
    items = [TrainItem(torch.randn(128, 2, 2, generator=gen), torch.randn(3, ctx_dim, generator=gen)) for _ in "ab"]
    settings = TrainSettings(rank=4, alpha=4, steps=2, checkpoint_every=0, sample_every=0)
    before = _state(model)

    plain = RunFolder.create(tmp_path / "plain", settings, {})
    with torch.inference_mode():
        train_in_comfy(model, items, settings, plain, False, None, None, None)
    assert trained and all(m is own for m in trained)
    trained.clear()

    calls: list[bool] = []
    dynamic = _dynamic(model, monkeypatch, calls)
    run = RunFolder.create(tmp_path / "dynamic", settings, {})
    with torch.inference_mode():
        outcome = train_in_comfy(dynamic, items, settings, run, False, None, None, None)
    assert outcome.result.steps_done == 2 and calls == [True]
    assert trained and all(m is not own for m in trained)
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in plain.read_metrics()]
    after = _state(dynamic)
    assert all(torch.equal(after[k], before[k]) for k in before)
