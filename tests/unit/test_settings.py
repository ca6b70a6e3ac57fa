"""Unit tests of TrainSettings: validation messages, presets, run.json round trip."""

from __future__ import annotations

import pytest
from klein_lora_lab.trainer_core.training.settings import PRESETS, SettingsError, TrainSettings, preset


def test_defaults_match_the_contract() -> None:
    """The defaults other modules rely on: rank/alpha 16, lr 1e-4, AdamW, attention targets, bf16, checkpointing."""
    s = TrainSettings()
    assert (s.rank, s.alpha, s.learning_rate, s.steps, s.optimizer, s.targets) == (
        16,
        16.0,
        1e-4,
        1000,
        "adamw",
        "attention",
    )
    assert (s.lr_schedule, s.mixed_precision, s.gradient_checkpointing, s.timestep_sampling) == (
        "constant",
        "bf16",
        True,
        "uniform",
    )


@pytest.mark.parametrize(
    ("field", "value", "range_text"),
    [
        ("rank", 0, "[1, 1024]"),
        ("rank", 2.5, "[1, 1024]"),
        ("learning_rate", 5.0, "[1e-09, 1]"),
        ("learning_rate", -1e-4, "[1e-09, 1]"),
        ("steps", 0, "[1, 1000000]"),
        ("caption_dropout", 1.5, "[0, 1]"),
        ("grad_accum", True, "[1, 1024]"),
        ("lr_schedule", "linear", "'constant', 'cosine'"),
        ("mixed_precision", "fp16", "'bf16', 'fp32'"),
        ("timestep_sampling", "sigmoid", "'uniform', 'logit_normal'"),
        ("optimizer", "sgd", "'adamw', 'adamw8bit'"),
    ],
)
def test_invalid_values_name_field_value_range_and_fix(field: str, value: object, range_text: str) -> None:
    """Every invalid value raises SettingsError naming the field, the bad value, the allowed range and a fix."""
    with pytest.raises(SettingsError) as err:
        TrainSettings(**{field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message
    assert range_text in message
    assert "Fix:" in message


def test_warmup_is_bounded_by_steps() -> None:
    """warmup_steps may not exceed steps; the message gives the real bound."""
    with pytest.raises(SettingsError, match=r"warmup_steps=200 .*\[0, 100\]"):
        TrainSettings(steps=100, warmup_steps=200)


def test_bad_target_spec_is_rejected_with_syntax_help() -> None:
    """A target spec that cannot parse fails at construction, with the accepted syntax in the message."""
    with pytest.raises(SettingsError, match="targets='bogus'.*blocks:double"):
        TrainSettings(targets="bogus")


def test_adamw8bit_run_opens_without_bitsandbytes_and_training_says_it_is_missing(tmp_path, monkeypatch) -> None:
    """Settings naming adamw8bit are valid where bitsandbytes is missing, so such a run.json opens anywhere (loss
    curve, diagnostics, sweet spot); starting or resuming training is what refuses, with the fix, before a step."""
    import sys

    import torch
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.trainer import train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, find_spec answers None
    settings = TrainSettings(optimizer="adamw8bit", rank=2, alpha=2, steps=2)
    run = RunFolder.create(tmp_path / "run", settings, {"trigger": "TOK"})
    reopened = RunFolder.open(tmp_path / "run")
    assert reopened.settings.optimizer == "adamw8bit"
    items = [TrainItem(torch.randn(128, 2, 2), torch.randn(3, 16), (), name="a")]
    model = tiny_klein(TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16))
    for resume in (False, True):
        with pytest.raises(SettingsError, match="install bitsandbytes"):
            train(model, items, settings, reopened if resume else run, resume=resume)
    assert reopened.checkpoints() == []


def test_presets_are_the_course_values() -> None:
    """The four presets carry the course's rank/alpha/lr and steps inside the course's ranges (DESIGN.md §6)."""
    expected = {
        "style": (16, 16.0, 3e-4, (500, 800)),
        "character": (32, 32.0, 2e-4, (800, 1200)),
        "object": (24, 24.0, 2e-4, (600, 1000)),
        "image_to_image": (32, 32.0, 1e-4, (250, 500)),
    }
    assert set(PRESETS) == set(expected)
    for name, (rank, alpha, lr, (lo, hi)) in expected.items():
        s = preset(name)
        assert (s.rank, s.alpha, s.learning_rate) == (rank, alpha, lr)
        assert lo <= s.steps <= hi


def test_preset_overrides_and_unknown_names() -> None:
    """Overrides apply on top of a preset and are validated; unknown presets or fields are named in the error."""
    s = preset("style", steps=300, seed=7)
    assert (s.rank, s.steps, s.seed) == (16, 300, 7)
    with pytest.raises(SettingsError, match="'nope'.*character"):
        preset("nope")
    with pytest.raises(SettingsError, match="colour"):
        preset("style", colour=1)
    with pytest.raises(SettingsError, match="rank=0"):
        preset("style", rank=0)


def test_json_round_trip_is_exact() -> None:
    """to_json/from_json reproduce the same frozen settings (run.json); unknown keys are an error."""
    s = TrainSettings(rank=8, alpha=4, learning_rate=3e-4, lr_schedule="cosine", warmup_steps=10, targets="binding")
    assert TrainSettings.from_json(s.to_json()) == s
    assert isinstance(TrainSettings.from_json(s.to_json()).alpha, float)
    with pytest.raises(SettingsError, match="unknown settings"):
        TrainSettings.from_json('{"rank": 4, "speed": 9}')
