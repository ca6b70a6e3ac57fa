"""Training options (memory mode, σ sampling, EMA, ...): validation, run.json and resume, the auto memory plan
under a simulated memory budget, its fallback, and the EMA file."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.klein import KleinShape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training import memory, trainer
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.ema import ema_path
from klein_lora_lab.trainer_core.training.faults import TrainingOutOfMemoryError
from klein_lora_lab.trainer_core.training.objective import flux2_shift_mu, sample_sigmas
from klein_lora_lab.trainer_core.training.options import (
    OPTION_FIELDS,
    TrainingOptions,
    keep_run_options,
    with_options,
)
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

GIB = 2**30
KLEIN_4B = KleinShape(hidden=3072, heads=24, double_blocks=5, single_blocks=20, context_dim=7680)
TOKENS_1024 = 64 * 64 + 512
SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
BASE = dict(rank=4, alpha=4, learning_rate=1e-3, steps=4, checkpoint_every=2, save_dtype="fp32")


def _items(n: int = 3) -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}") for i in range(n)
    ]


class FakeProbe:
    """A memory budget on the CPU: `in_use` held now, `limit` the most the process may hold, a settable peak."""

    def __init__(self, in_use: int, limit: int, peak: int = 0) -> None:
        self.in_use, self.limit, self.measured = in_use, limit, peak

    def budget(self) -> memory.MemoryBudget:
        return memory.MemoryBudget(self.in_use, self.limit)

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return self.measured


class Notices(TrainCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_notice(self, text: str) -> None:
        self.lines.append(text)


# -- settings and options -----------------------------------------------------------------------------------


def test_new_settings_are_validated_with_a_fix() -> None:
    """memory_mode, ema_decay and the new σ sampling are checked like every other field, naming the value."""
    TrainSettings(memory_mode="auto", ema_decay=0.999, timestep_sampling="flux2_shift")
    with pytest.raises(SettingsError, match="memory_mode='lots'"):
        TrainSettings(memory_mode="lots")
    with pytest.raises(SettingsError, match="ema_decay=0.1"):
        TrainSettings(ema_decay=0.1)
    with pytest.raises(SettingsError, match="ema_decay=1"):
        TrainSettings(ema_decay=1.0)


def test_options_decide_every_option_field_and_are_checked_against_the_preset() -> None:
    """Every option lands in its TrainSettings field; a warmup longer than the run fails naming warmup_steps."""
    assert set(OPTION_FIELDS) <= {f.name for f in fields(TrainSettings)}
    opts = TrainingOptions(
        memory="recompute share",
        recompute_share=0.4,
        lr_schedule="cosine",
        warmup_steps=10,
        grad_accum=2,
        caption_dropout=0.05,
        timestep_sampling="flux2_shift",
        ema_decay=0.99,
        save_dtype="fp16",
        compile="off",
    )
    s = with_options(TrainSettings(steps=100), opts)
    assert set(opts.overrides()) == set(OPTION_FIELDS)
    assert (s.memory_mode, s.checkpoint_share, s.gradient_checkpointing) == ("share", 0.4, True)
    assert (s.lr_schedule, s.warmup_steps, s.grad_accum, s.caption_dropout) == ("cosine", 10, 2, 0.05)
    assert (s.timestep_sampling, s.ema_decay, s.save_dtype, s.compile_blocks) == ("flux2_shift", 0.99, "fp16", "off")
    assert with_options(TrainSettings(), None).memory_mode == "auto"  # no options input: auto memory
    with pytest.raises(SettingsError, match="warmup_steps=200"):
        with_options(TrainSettings(steps=100), TrainingOptions(warmup_steps=200))
    with pytest.raises(ValueError, match="memory='huge'"):
        TrainingOptions(memory="huge")


def test_a_resume_without_options_keeps_the_runs_options() -> None:
    """keep_run_options copies every option field from the stored settings and nothing else."""
    stored = with_options(TrainSettings(steps=50, rank=8), TrainingOptions(memory="fastest", ema_decay=0.9))
    now = keep_run_options(TrainSettings(steps=80, rank=8), stored)
    assert (now.memory_mode, now.ema_decay, now.steps) == ("fastest", 0.9, 80)


def test_runs_made_before_the_options_resume(tmp_path: Path) -> None:
    """A run.json written before memory_mode/ema_decay existed opens with the old behaviour (the stored
    recompute share, no EMA) and resumes under the node's new default (memory auto is a resumable change)."""
    s = TrainSettings(**BASE)
    run = RunFolder.create(tmp_path, s, {})
    train(tiny_klein(SPEC), _items(), s, run)
    data = json.loads((tmp_path / "run.json").read_text())
    for name in ("memory_mode", "ema_decay"):
        del data["settings"][name]
    (tmp_path / "run.json").write_text(json.dumps(data))
    old = RunFolder.open(tmp_path)
    assert (old.settings.memory_mode, old.settings.ema_decay, old.settings.checkpoint_share) == ("share", 0.0, 1.0)
    later = with_options(TrainSettings(**{**BASE, "steps": 6}), None)
    result = train(tiny_klein(SPEC), _items(), later, old, resume=True)
    assert result.steps_done == 6
    assert RunFolder.open(tmp_path).settings.memory_mode == "auto"


# -- σ sampling -----------------------------------------------------------------------------------------------


def test_flux2_shift_follows_musubi_tuners_line() -> None:
    """μ is 0.5 at 256 tokens and 1.15 at 4096; the median σ is the shifted median t = 0.5."""
    assert math.isclose(flux2_shift_mu(256), 0.5) and math.isclose(flux2_shift_mu(4096), 1.15)
    sigma = sample_sigmas(20000, 4096, torch.Generator().manual_seed(0), "flux2_shift")
    shift = math.exp(1.15)
    assert abs(sigma.median().item() - shift / (shift + 1)) < 0.01
    assert 0 < sigma.min() and sigma.max() < 1


# -- auto memory ----------------------------------------------------------------------------------------------


def _plan(limit_gib: float, mode: str = "auto", in_use_gib: float = 7.0) -> memory.MemoryPlan:
    probe = FakeProbe(int(in_use_gib * GIB), int(limit_gib * GIB))
    settings = TrainSettings(memory_mode=mode)
    return memory.plan_memory(settings, KLEIN_4B, TOKENS_1024, True, 35_000_000, probe)


def test_auto_picks_the_least_recompute_that_fits() -> None:
    """Under a budget auto chooses the smallest recompute share whose expected peak fits the limit minus the
    margin (one block fewer recomputed would not fit); a large budget recomputes nothing."""
    for limit in (10.0, 12.0, 16.0, 20.0):
        plan = _plan(limit)
        room = plan.limit - memory.margin(plan.limit)
        assert plan.expected_peak <= room, limit
        if plan.share > 0:
            assert plan.peak_at(plan.share - 1 / plan.blocks) > room, limit
        assert f"{plan.expected_peak / GIB:.1f} GiB" in plan.describe()
    assert _plan(12.0).share > _plan(16.0).share > _plan(20.0).share
    assert _plan(40.0).share == 0.0
    assert 8.0 < _plan(40.0, "least_memory").expected_peak / GIB < 10.0  # measured 9.2 GiB on an H200


def test_auto_moves_the_block_inputs_to_the_host_where_least_memory_does_not_fit() -> None:
    """Where every block recomputed would not fit but the same without the blocks' inputs on the device does,
    auto keeps those inputs in host memory and says so; where even that does not fit it says so too; where
    least memory fits nothing is offloaded."""
    plan = _plan(9.2)
    room = plan.limit - memory.margin(plan.limit)
    assert plan.peak_at(1.0, offload=False) > room >= plan.expected_peak
    assert plan.share == 1.0 and plan.offload and "their inputs in host memory" in plan.describe()
    assert "Least memory does not fit" in plan.describe()
    worse = _plan(7.5)
    assert worse.offload and "Even least memory with the blocks' inputs in host memory may not fit" in worse.reason
    assert not _plan(12.0).offload


def test_fixed_modes_and_no_probe() -> None:
    """fastest/least memory/share ignore the budget; auto without a probe (CPU) recomputes nothing."""
    assert _plan(12.0, "fastest").share == 0.0
    assert _plan(12.0, "least_memory").share == 1.0
    s = TrainSettings(memory_mode="share", checkpoint_share=0.4)
    assert memory.plan_memory(s, KLEIN_4B, TOKENS_1024, True, 0, None).share == 0.4
    cpu = memory.plan_memory(TrainSettings(memory_mode="auto"), KLEIN_4B, TOKENS_1024, True, 0, None)
    assert cpu.share == 0.0 and "No device memory limit" in cpu.reason


def test_first_step_peak_corrects_the_plan() -> None:
    """A first step that peaks higher than estimated raises the recompute share so the new estimate fits; a
    lower peak never lowers it (fragmentation under a cap does not show in the peak)."""
    plan = _plan(16.0)
    checked = memory.check_first_step(plan, plan.expected_peak + 3 * GIB)
    assert checked.share > plan.share
    assert checked.expected_peak <= checked.limit - memory.margin(checked.limit)
    assert "First step peaked" in checked.reason
    assert memory.check_first_step(plan, plan.expected_peak - 2 * GIB) == plan  # lower: the plan stays
    assert memory.check_first_step(_plan(16.0, "fastest"), 100 * GIB).share == 0.0  # only auto is corrected


def test_auto_plan_reaches_the_callbacks_and_the_trainer(tmp_path: Path) -> None:
    """train() reports the plan through on_notice and trains with the chosen share."""
    s = TrainSettings(**BASE, memory_mode="auto")
    notices = Notices()
    probe = FakeProbe(0, 100 * GIB, peak=1)
    train(tiny_klein(SPEC), _items(), s, RunFolder.create(tmp_path, s, {}), notices, memory_probe=probe)
    assert notices.lines and notices.lines[0].startswith("memory auto: nothing recomputed")


def test_out_of_memory_falls_back_to_least_memory(tmp_path: Path, monkeypatch) -> None:
    """In auto, a step that runs out of memory with blocks kept is retried once with every block recomputed,
    says so, and the run trains on exactly as a least-memory run does; a chosen mode (fastest) fails instead,
    with the advice."""
    real = trainer.klein_forward
    shares: list[float] = []

    def forward(*args, **kwargs):
        share = args[6]
        shares.append(share)
        if share < 1.0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "klein_forward", forward)
    s = TrainSettings(**BASE, memory_mode="auto")
    notices = Notices()
    run = RunFolder.create(tmp_path / "a", s, {})
    train(tiny_klein(SPEC), _items(), s, run, notices, memory_probe=FakeProbe(0, 100 * GIB, peak=1))
    assert shares[0] == 0.0 and set(shares[1:]) == {1.0}
    assert "fell back to least memory" in notices.lines[-1]
    assert memory.fall_back(memory.fall_back(_plan(12.0), "oom"), "oom").offload  # then the inputs go to host
    least = TrainSettings(**BASE, memory_mode="least_memory")
    ref = RunFolder.create(tmp_path / "b", least, {})
    train(tiny_klein(SPEC), _items(), least, ref)
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in ref.read_metrics()]
    fastest = TrainSettings(**BASE, memory_mode="fastest")
    with pytest.raises(TrainingOutOfMemoryError, match="out of device memory"):
        train(tiny_klein(SPEC), _items(), fastest, RunFolder.create(tmp_path / "c", fastest, {}))


# -- EMA ------------------------------------------------------------------------------------------------------


def test_ema_is_saved_beside_each_checkpoint_and_survives_resume(tmp_path: Path) -> None:
    """Each checkpoint has its EMA LoRA beside it (a LoRA file of its own, not a checkpoint of the run); a run
    stopped and resumed writes the same EMA as one that never stopped."""
    s = TrainSettings(**BASE, ema_decay=0.9)
    whole = RunFolder.create(tmp_path / "whole", s, {})
    train(tiny_klein(SPEC), _items(), s, whole)
    assert [p.name for p in whole.checkpoints()] == ["step_000002.safetensors", "step_000004.safetensors"]
    final = ema_path(whole.checkpoints()[-1])
    assert final.name == "step_000004.ema.safetensors" and final.is_file()
    ema, meta = load_lora(final)
    trained, _ = load_lora(whole.checkpoints()[-1])
    assert meta["klein_lab.ema_decay"] == "0.9"
    name = sorted(ema)[0]
    assert not torch.equal(ema[name].up, trained[name].up)  # an average, not the last weights

    half = TrainSettings(**{**BASE, "steps": 2}, ema_decay=0.9)
    split = RunFolder.create(tmp_path / "split", half, {})
    train(tiny_klein(SPEC), _items(), half, split)
    train(tiny_klein(SPEC), _items(), s, RunFolder.open(tmp_path / "split"), resume=True)
    resumed, _ = load_lora(ema_path(split.checkpoints()[-1]))
    for key in ema:
        assert torch.equal(resumed[key].down, ema[key].down) and torch.equal(resumed[key].up, ema[key].up)


def test_fp8_compute_on_a_cpu_trains_in_bf16_and_says_why(tmp_path: Path) -> None:
    """A run asking for fp8 compute on a device without fp8 tensor cores trains exactly as a bf16 run and the
    Train node is told why (compute stays 'fp8' in run.json, so a GPU that has them uses it on resume)."""
    s = TrainSettings(**BASE, compute="fp8")
    notices = Notices()
    run = RunFolder.create(tmp_path / "a", s, {})
    train(tiny_klein(SPEC), _items(), s, run, notices)
    assert any("fp8 compute needs" in line and "computing in bf16" in line for line in notices.lines)
    plain = TrainSettings(**BASE)
    ref = RunFolder.create(tmp_path / "b", plain, {})
    train(tiny_klein(SPEC), _items(), plain, ref)
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in ref.read_metrics()]
    assert run.settings.compute == "fp8"
