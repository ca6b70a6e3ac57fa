"""Training other adapter types: rsLoRA on the fused path, LoKr and DoRA through PEFT's tuner layers.

Locked in: the model the run trains on is left bit-identical (values, dtypes, flags, module tree) after a run
and after an exception mid-run; a run stopped and resumed equals a run that never stopped, for every type; the
checkpoint files are read back by the pack's loader into exactly the adapter that was trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness.callbacks import StopAt
from klein_lora_lab.trainer_core.lora.adapter_math import place
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack
from klein_lora_lab.trainer_core.lora.lora_formats import read_lora_file
from klein_lora_lab.trainer_core.lora.peft_trainable import PeftTrainable
from klein_lora_lab.trainer_core.model.klein import klein_forward, read_shape
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.options import TrainingOptions, with_options
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train
from safetensors import safe_open

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
BASE = dict(rank=4, alpha=8, learning_rate=3e-3, steps=4, checkpoint_every=2, save_dtype="fp32")
ALGORITHMS = ("lora", "rslora", "lokr", "dora")


def _items() -> list[TrainItem]:
    g = torch.Generator().manual_seed(3)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}") for i in range(3)
    ]


def _snapshot(model: torch.nn.Module) -> tuple[dict, list, list]:
    """Everything a run could change on the model: tensors, parameter flags and the module tree."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()]
    tree = [(n, type(m).__name__, m.training) for n, m in model.named_modules()]
    return state, flags, tree


def _assert_same(model: torch.nn.Module, before: tuple[dict, list, list]) -> None:
    state, flags, tree = _snapshot(model)
    assert tree == before[2]
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert v.dtype == before[0][k].dtype and torch.equal(v, before[0][k]), k


class _Boom(TrainCallbacks):
    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        if step == 2:
            raise KeyboardInterrupt("cancelled")


def _settings(algorithm: str, **kw) -> TrainSettings:
    return TrainSettings(**{**BASE, "algorithm": algorithm, "targets": "all_linear", **kw})


def _train(path: Path, settings: TrainSettings, model=None, callbacks=None, resume=False):
    model = model if model is not None else tiny_klein(SPEC)
    run = RunFolder.open(path) if resume else RunFolder.create(path, settings, {"trigger": "TOK"})
    return run, train(model, _items(), settings, run, callbacks, resume=resume)


def _losses(run: RunFolder) -> list[float]:
    return [r["loss"] for r in run.read_metrics()]


def _resume_tensors(run: RunFolder) -> dict[str, torch.Tensor]:
    step = max(int(p.stem.split("_")[1].split(".")[0]) for p in run.checkpoints())
    return run.load_state(step)[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_stop_and_resume_is_exact_and_the_model_is_untouched(tmp_path: Path, algorithm: str) -> None:
    """4 steps in one go equal 2 steps, a stop, and 2 resumed steps: same losses bit for bit, same adapter and
    optimizer state; the model trained on is bit-identical (values, flags, module tree) after each run."""
    s = _settings(algorithm)
    model = tiny_klein(SPEC)
    before = _snapshot(model)
    full_run, full = _train(tmp_path / "full", s, model)
    _assert_same(model, before)
    assert full.steps_done == 4
    _, part = _train(tmp_path / "part", s, callbacks=StopAt(2))
    assert part.stopped_early and part.steps_done == 2
    resumed_run, resumed = _train(tmp_path / "part", s, resume=True)
    assert resumed.steps_done == 4
    assert _losses(resumed_run) == _losses(full_run)
    a, b = _resume_tensors(full_run), _resume_tensors(resumed_run)
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full_run)[0] != _losses(full_run)[-1]  # it trained


@pytest.mark.parametrize("algorithm", ("lokr", "dora"))
def test_an_exception_mid_run_leaves_the_model_bit_identical(tmp_path: Path, algorithm: str) -> None:
    """A Cancel (an exception from a callback) in the middle of a PEFT run leaves the model exactly as it was,
    and the last finished step is kept as a checkpoint."""
    model = tiny_klein(SPEC)
    before = _snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "boom", _settings(algorithm), model, callbacks=_Boom())
    _assert_same(model, before)
    assert [p.name for p in RunFolder.open(tmp_path / "boom").checkpoints()] == ["step_000002.safetensors"]


def _prediction(model, adapters) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 128, 2, 3, generator=g)
    with torch.no_grad():
        return klein_forward(model, x, torch.tensor([0.6]), tiny_conditioning(SPEC, 4), adapters=adapters)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checkpoint_file_loads_as_the_trained_adapter(tmp_path: Path, algorithm: str) -> None:
    """The checkpoint file, read by the pack's loader (any key style) and placed on the model as a forward-time
    adapter, predicts what the trained adapter predicts (fp32 file, ≤ 1e-5); it changed the prediction. A DoRA
    file's report says its magnitudes follow core's norm rule (from its header)."""
    model = tiny_klein(SPEC)
    _, result = _train(tmp_path / "run", _settings(algorithm, learning_rate=3e-2), model)
    read = read_lora_file(result.last_checkpoint, read_shape(model))
    assert read.unmatched == []
    assert any("base weight's row norm" in n for n in read.notes) == (algorithm == "dora")
    stack = AdapterStack()
    weights = {n: place(a, "cpu", torch.float32, model.get_submodule(n).weight) for n, a in read.weights.items()}
    assert set(weights) == set(result.lora.names)
    stack.set_lora("run", weights, 1.0)
    trained, loaded, base = _prediction(model, result.lora), _prediction(model, stack), _prediction(model, None)
    assert (trained - base).abs().max() > 1e-3
    assert (trained - loaded).abs().max() < 1e-5


def test_file_keys_follow_lycoris_and_comfyui() -> None:
    """LoKr files hold lokr_w1 / lokr_w2(_a/_b) + alpha; DoRA files lora_A/lora_B + alpha + dora_scale [out, 1]."""
    model = tiny_klein(SPEC)
    targets = resolve_targets(model, "attention")
    lokr = PeftTrainable(model, targets, "lokr", 4, 8, lokr_factor=-1).file_tensors()
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert {k for k in lokr if k.startswith(name + ".")} == {
        f"{name}.lokr_w1",
        f"{name}.lokr_w2_a",
        f"{name}.lokr_w2_b",
        f"{name}.alpha",
    }
    assert float(lokr[f"{name}.alpha"]) == 8.0
    dora = PeftTrainable(model, targets, "dora", 4, 8).file_tensors()
    assert dora[f"{name}.dora_scale"].shape == (3 * 128, 1)
    assert dora[f"{name}.lora_A.weight"].shape == (4, 128)
    # DoRA starts at the base weight's row norms (PEFT's init): the adapter starts as the identity.
    norms = model.get_submodule("double_blocks.0.img_attn.qkv").weight.norm(dim=1)
    assert torch.allclose(dora[f"{name}.dora_scale"].reshape(-1), norms)


def test_lokr_factor_shapes_the_kronecker_factors() -> None:
    """lokr_factor splits each side as factor × rest (PEFT's factorization): 8 on a 128 → 384 Linear gives a
    w1 of [8, 8]; -1 gives the most balanced split."""
    model = tiny_klein(SPEC)
    name = "double_blocks.0.img_attn.qkv"
    eight = PeftTrainable(model, [name], "lokr", 4, 4, lokr_factor=8).layer(name).lokr_w1["default"]
    balanced = PeftTrainable(model, [name], "lokr", 4, 4, lokr_factor=-1).layer(name).lokr_w1["default"]
    assert tuple(eight.shape) == (8, 8)
    assert tuple(balanced.shape) != (8, 8)


def test_rslora_scales_by_the_square_root_and_files_say_so(tmp_path: Path) -> None:
    """rsLoRA trains with scale alpha/√rank; its file stores alpha·√rank so that every loader's alpha/rank
    gives that scale."""
    _, result = _train(tmp_path / "rs", _settings("rslora", rank=4, alpha=8))
    assert result.lora.scale == pytest.approx(8 / 2)
    with safe_open(str(result.last_checkpoint), "pt") as f:
        alpha = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.alpha")
        assert f.metadata()["klein_lab.algorithm"] == "rslora"
    assert float(alpha) == pytest.approx(16.0)


def test_algorithm_settings_are_validated_and_old_runs_default_to_lora() -> None:
    """algorithm and lokr_factor are checked with a fix; EMA is refused for LoKr/DoRA (its file is a plain
    LoRA); a run.json written before these fields opens as plain LoRA; the options node sets them."""
    with pytest.raises(SettingsError, match="algorithm='loha'"):
        TrainSettings(algorithm="loha")
    with pytest.raises(SettingsError, match="lokr_factor=0"):
        TrainSettings(lokr_factor=0)
    with pytest.raises(SettingsError, match="ema_decay=0.999"):
        TrainSettings(algorithm="dora", ema_decay=0.999)
    old = TrainSettings().to_dict()
    del old["algorithm"], old["lokr_factor"]
    assert TrainSettings.from_json(old).algorithm == "lora"
    chosen = with_options(TrainSettings(), TrainingOptions(algorithm="lokr", lokr_factor=8))
    assert (chosen.algorithm, chosen.lokr_factor) == ("lokr", 8)


def test_dora_refuses_fp8_base_weights() -> None:
    """DoRA takes the norm of the base weight: fp8 weights are refused by name with the fix."""
    model = tiny_klein(SPEC)
    name = "double_blocks.0.img_attn.qkv"
    model.get_submodule(name).weight.data = model.get_submodule(name).weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="DoRA needs the model's weights"):
        PeftTrainable(model, [name], "dora", 4, 4)


def test_auto_compile_keeps_peft_layers_eager() -> None:
    """compile auto compiles the fused LoRA paths on CUDA only; LoKr and DoRA stay eager unless compile is on."""
    from klein_lora_lab.trainer_core.training.trainer import compiles_blocks

    assert compiles_blocks(TrainSettings(algorithm="rslora"), "cuda")
    assert not compiles_blocks(TrainSettings(algorithm="lokr"), "cuda")
    assert not compiles_blocks(TrainSettings(algorithm="lora"), "cpu")
    assert compiles_blocks(TrainSettings(algorithm="dora", compile_blocks="on"), "cpu")
