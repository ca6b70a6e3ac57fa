"""Sweeps without ComfyUI: parsing a knob's values, the plan of runs and their names, run status for resuming,
the manifest file and the existing-runs check."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from klein_lora_lab.trainer_core.files.safe_paths import MAX_NAME_BYTES
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.runs.sweep import (
    FINISHED,
    MISSING,
    PARTIAL,
    Sweep,
    SweepError,
    check_existing,
    knobs,
    manifest_path,
    parse_values,
    plan_sweep,
    read_manifest,
    run_name,
    run_status,
    statuses,
    write_manifest,
)
from klein_lora_lab.trainer_core.training.settings import TrainSettings, field_names, preset
from klein_lora_lab.trainer_core.training.trainer import RESUMABLE_CHANGES

BASE = TrainSettings(rank=4, alpha=4.0, learning_rate=1e-4, steps=4, checkpoint_every=2)


def build_on(base: TrainSettings, knob: str):
    return lambda value: replace(base, **{knob: value})


def test_every_settings_field_is_a_knob() -> None:
    """The knob list is the preset plus every TrainSettings field, so an option added to the settings can be
    swept without touching the sweep code."""
    assert knobs() == ["preset", *field_names()]


@pytest.mark.parametrize(
    ("knob", "text", "expected"),
    [
        ("learning_rate", "1e-5, 5e-5, 2e-4", [1e-5, 5e-5, 2e-4]),
        ("rank", "8\n16\n32", [8, 16, 32]),
        ("steps", "250; 500; 1e3", [250, 500, 1000]),
        ("gradient_checkpointing", "on, off", [True, False]),
        ("targets", "attention; binding,identity", ["attention", "binding,identity"]),
        ("timestep_sampling", "uniform\nlogit_normal", ["uniform", "logit_normal"]),
        ("preset", "style; character", ["style", "character"]),
    ],
)
def test_values_parse_with_the_fields_type(knob, text, expected) -> None:
    """Values are split on commas, semicolons and lines (text knobs keep their commas) and parsed with the
    field's type: floats, whole numbers (1e3 too), on/off, text."""
    values = parse_values(knob, text)
    assert values == expected
    assert [type(v) for v in values] == [type(v) for v in expected]


@pytest.mark.parametrize(
    ("knob", "text", "message"),
    [
        ("rank", "8, 16.5", "'16.5' is not a whole number"),
        ("learning_rate", "1e-5, fast", "'fast' is not a number"),
        ("learning_rate", "nan", "is not a number"),
        ("gradient_checkpointing", "maybe", "on or off"),
        ("rank", "8, 8", "listed twice"),
        ("rank", " , ", "no value for rank"),
        ("preset", "style; portrait", "preset 'portrait' does not exist"),
        ("speed", "1, 2", "knob 'speed' does not exist"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(knob, text, message) -> None:
    """A value that does not parse, a duplicate, an empty list or an unknown knob is refused with a message
    naming it."""
    with pytest.raises(SweepError, match=message):
        parse_values(knob, text)


def test_plan_keeps_everything_but_the_knob() -> None:
    """One run per value in the order typed; the settings of two runs differ only in the knob; names and labels
    are derived from the sweep name and the value."""
    plan = plan_sweep("lr", "learning_rate", [1e-5, 5e-5, 2e-4], build_on(BASE, "learning_rate"))
    assert [r.name for r in plan.runs] == [
        "lr-learning_rate-1e-05",
        "lr-learning_rate-5e-05",
        "lr-learning_rate-0.0002",
    ]
    assert [r.label for r in plan.runs] == ["learning_rate=1e-05", "learning_rate=5e-05", "learning_rate=0.0002"]
    assert plan.values == (1e-5, 5e-5, 2e-4)
    for a in plan.runs:
        for b in plan.runs:
            assert set(a.settings.differences(b.settings)) <= {"learning_rate"}


def test_invalid_value_is_refused_by_the_settings() -> None:
    """A value TrainSettings refuses (rank 0, lr 5) fails the plan before anything trains, naming the run."""
    with pytest.raises(SweepError, match=r"rank=0 \(run 2 of the sweep\).*rank=0 is not allowed"):
        plan_sweep("r", "rank", [8, 0], build_on(BASE, "rank"))


def test_plan_refuses_a_value_the_settings_do_not_carry() -> None:
    """A builder that falls back to another value (0 = the preset's) is caught: the run would not be what its
    name says."""
    with pytest.raises(SweepError, match="would train with rank=16 instead"):
        plan_sweep("r", "rank", [8, 0], lambda v: replace(BASE, rank=v or 16))


def test_preset_knob_builds_each_preset() -> None:
    """The preset knob gives each run its preset's rank, alpha, learning rate and steps."""
    plan = plan_sweep("p", "preset", ["style", "character"], lambda v: preset(v, seed=3))
    assert [(r.settings.rank, r.settings.learning_rate) for r in plan.runs] == [(16, 3e-4), (32, 2e-4)]
    assert [r.name for r in plan.runs] == ["p-preset-style", "p-preset-character"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("binding,identity", "s-targets-binding_identity"),
        ("regex:.*img_attn.*", "s-targets-regex_._img_attn"),
        (True, "s-gradient_checkpointing-on"),
        ("blocks:double.0,single.5-9", "s-targets-blocks_double.0_single.5-9"),
    ],
)
def test_run_names_are_safe(value, expected) -> None:
    """Characters a run name may not hold (':', ',', '*', separators) become '_'; leading/trailing dots go."""
    knob = "gradient_checkpointing" if isinstance(value, bool) else "targets"
    assert run_name("s", knob, value) == expected


def test_long_values_keep_distinct_names() -> None:
    """Two long values sharing their start get names within the length limit that still differ."""
    a = run_name("s", "targets", "regex:" + "a" * 200 + "1")
    b = run_name("s", "targets", "regex:" + "a" * 200 + "2")
    assert a != b and len(a.encode()) <= MAX_NAME_BYTES and len(b.encode()) <= MAX_NAME_BYTES


def test_values_clashing_on_one_name_are_refused() -> None:
    """Two values that differ only in characters a name cannot hold would share a folder: refused."""
    with pytest.raises(SweepError, match="same run name"):
        plan_sweep("s", "targets", ["regex:img_attn", "regex:img:attn"], build_on(BASE, "targets"))


@pytest.mark.parametrize("name", ["../x", "a/b", "lr sweep", "", "con"])
def test_sweep_name_is_checked(name) -> None:
    """The sweep name becomes part of folder names: separators, '..', spaces, empty and reserved names are refused."""
    with pytest.raises(ValueError):
        plan_sweep(name, "rank", [4], build_on(BASE, "rank"))


def _fake_checkpoint(run: RunFolder, step: int) -> None:
    run.checkpoint_path(step).write_bytes(b"x")


def test_run_status_finished_partial_missing(tmp_path) -> None:
    """A run with a checkpoint at its last step is finished; a started run without it is partial (it resumes);
    a folder without run.json is missing (it starts)."""
    plan = plan_sweep("st", "rank", [2, 4, 8], build_on(BASE, "rank"))
    done = RunFolder.create(tmp_path / plan.runs[0].name, plan.runs[0].settings, {})
    _fake_checkpoint(done, 2)
    _fake_checkpoint(done, 4)
    half = RunFolder.create(tmp_path / plan.runs[1].name, plan.runs[1].settings, {})
    _fake_checkpoint(half, 2)
    assert statuses(tmp_path, plan) == [FINISHED, PARTIAL, MISSING]
    assert run_status(tmp_path / plan.runs[1].name, steps=2) == FINISHED  # fewer steps asked: already there


def test_existing_runs_with_other_settings_are_refused(tmp_path) -> None:
    """Queueing a sweep again continues its runs; a started run whose settings differ (other than what a resume
    may change, such as steps) is refused with the difference and the fix."""
    plan = plan_sweep("ex", "rank", [2, 4], build_on(BASE, "rank"))
    RunFolder.create(tmp_path / plan.runs[0].name, plan.runs[0].settings, {})
    check_existing(tmp_path, plan, RESUMABLE_CHANGES)
    longer = plan_sweep("ex", "rank", [2, 4], build_on(replace(BASE, steps=8), "rank"))
    check_existing(tmp_path, longer, RESUMABLE_CHANGES)  # more steps: the runs resume
    other = plan_sweep("ex", "rank", [2, 4], build_on(replace(BASE, seed=9), "rank"))
    with pytest.raises(SweepError, match=r"run 'ex-rank-2' .*seed: run 0 vs now 9.*new name"):
        check_existing(tmp_path, other, RESUMABLE_CHANGES)


def test_manifest_round_trip_is_atomic(tmp_path, monkeypatch) -> None:
    """The manifest holds knob, values, labels, run names, statuses and settings; Sweep.from_manifest gives the
    same socket value as the plan; a failed write leaves the previous manifest whole."""
    plan = plan_sweep("mf", "learning_rate", [1e-5, 2e-4], build_on(BASE, "learning_rate"))
    path = write_manifest(tmp_path, plan, [FINISHED, MISSING])
    assert path == manifest_path(tmp_path, "mf") and path.name == "mf.sweep.json"
    data = read_manifest(tmp_path, "mf")
    assert data["knob"] == "learning_rate" and data["values"] == [1e-5, 2e-4]
    assert [r["status"] for r in data["runs"]] == [FINISHED, MISSING]
    assert TrainSettings.from_json(data["runs"][1]["settings"]) == plan.runs[1].settings
    assert Sweep.from_manifest(data) == Sweep.of(plan)
    before = path.read_bytes()

    def torn(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.write", torn)
    monkeypatch.setattr("os.fdopen", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_manifest(tmp_path, plan, [FINISHED, FINISHED])
    monkeypatch.undo()
    assert path.read_bytes() == before and json.loads(before)["runs"][1]["status"] == MISSING
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mf.sweep.json"]  # no temporary file left behind


def test_missing_manifest_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train the sweep first"):
        read_manifest(tmp_path, "nothing")


def test_socket_value_is_hashable_and_ordered() -> None:
    """The KLEIN_SWEEP value is frozen (ComfyUI may cache it) and keeps the typed order."""
    plan = plan_sweep("o", "rank", [32, 8, 16], build_on(BASE, "rank"))
    sweep = Sweep.of(plan)
    assert sweep.values == (32, 8, 16) and sweep.labels == ("rank=32", "rank=8", "rank=16")
    assert hash(sweep) == hash(Sweep.of(plan))
    assert torch.tensor(list(sweep.values)).tolist() == [32, 8, 16]
