"""A sweep: one knob, a list of values, one training run per value with everything else identical.

The lab's real trainings change a single parameter each time (steps 300 → 2500, learning rate timid 1e-5 /
default 5e-5 / frantic 2e-4, rank 8 / 16 / 32) with the dataset, seed and prompts fixed. This module plans such
a sweep and keeps its bookkeeping; the training itself is the ordinary run (trainer.train through the Train
node's path), so a run of a sweep is exactly the run trained alone with the same settings.

* `parse_values(knob, text)`: the values typed for a knob, parsed with the type of that TrainSettings field
  (or preset names for the knob "preset").
* `plan_sweep(name, knob, values, build)`: one `SweepRun` per value, its settings built by `build(value)` (and
  validated by TrainSettings), its run name derived from the sweep name and the value (`run_name`).
* `run_status(folder, steps)`: finished / partial / missing, what queueing the sweep again does with each run.
* `check_existing(runs_root, plan)`: refuses a sweep whose existing runs were trained with other settings.
* The manifest `<runs>/<name>.sweep.json` (written atomically) lists the knob, values, labels, run names and each
  run's status; `Sweep` is what the KLEIN_SWEEP socket carries.

    <runs>/lr.sweep.json                 the manifest
    <runs>/lr-learning_rate-1e-05/       an ordinary run folder (run.json, checkpoints/, metrics.jsonl, ...)
    <runs>/lr-learning_rate-5e-05/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files.atomic import atomic_write_bytes
from ..files.safe_paths import MAX_NAME_BYTES, child_path, safe_name
from ..training.settings import PRESETS, SettingsError, TrainSettings, field_names
from .runfolder import RunFolder, checkpoint_step

SWEEP_FORMAT = "klein_lab.sweep.v1"
MANIFEST_SUFFIX = ".sweep.json"
PRESET_KNOB = "preset"
MAX_RUNS = 32  # one sweep trains at most this many runs (each a full training run)
FINISHED, PARTIAL, MISSING = "finished", "partial", "missing"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")  # what a derived run name may hold (the Train node's run-name rule)
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


class SweepError(ValueError):
    """An invalid sweep; the message names the knob or value and how to fix it."""


def knobs() -> list[str]:
    """Every knob a sweep can vary: the preset, then every TrainSettings field."""
    return [PRESET_KNOB, *field_names()]


def _field_type(knob: str) -> str:
    types = {f.name: f.type for f in dataclasses.fields(TrainSettings)}
    if knob not in types:
        raise SweepError(f"knob {knob!r} does not exist: use one of {knobs()}.")
    return str(types[knob])


def _split(text: str, knob: str, kind: str) -> list[str]:
    """Value texts: one per line or separated by ';' (and by ',' for number and on/off knobs; a text knob such as
    targets keeps its commas: 'binding,identity' is one value)."""
    seps = r"[\n;]" if kind == "str" or knob == PRESET_KNOB else r"[\n;,]"
    return [t.strip() for t in re.split(seps, text) if t.strip()]


def _parse_one(knob: str, kind: str, text: str) -> Any:
    try:
        if kind == "bool":
            low = text.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(text)
        if kind == "int":
            number = float(text)  # "1e3" and "1000" both mean 1000
            if not math.isfinite(number) or number != int(number):
                raise ValueError(text)
            return int(number)
        if kind == "float":
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
    except ValueError:
        what = {"bool": "on or off", "int": "a whole number", "float": "a number"}[kind]
        raise SweepError(
            f"{knob}: {text!r} is not {what}; type the values separated by commas, e.g. {_example(knob)}."
        ) from None
    return text


def _example(knob: str) -> str:
    return {"learning_rate": "'1e-5, 5e-5, 2e-4'", "rank": "'8, 16, 32'", "steps": "'250, 500, 1000'"}.get(
        knob, "'1, 2, 3'"
    )


def parse_values(knob: str, text: str) -> list[Any]:
    """The values typed for `knob`, in the order typed, parsed with the knob's type. Duplicates are refused."""
    kind = "str" if knob == PRESET_KNOB else _field_type(knob)
    values = [_parse_one(knob, kind, t) for t in _split(text, knob, kind)]
    if not values:
        raise SweepError(f"no value for {knob}: type the values to try, e.g. {_example(knob)}.")
    if knob == PRESET_KNOB:
        unknown = [v for v in values if v not in PRESETS]
        if unknown:
            raise SweepError(f"preset {unknown[0]!r} does not exist: use some of {sorted(PRESETS)}.")
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise SweepError(f"{knob}: the value {value_text(v)} is listed twice; each run needs its own value.")
        seen.append(v)
    if len(values) > MAX_RUNS:
        raise SweepError(f"{len(values)} values for {knob}: one sweep trains at most {MAX_RUNS} runs.")
    return values


def value_text(value: Any) -> str:
    """How a value reads in labels: 1e-05, 0.0002, 16, on/off, the text as typed."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label(knob: str, value: Any) -> str:
    """ "learning_rate=1e-05": what a run of a sweep is called in labels, grids and readings."""
    return f"{knob}={value_text(value)}"


def run_name(sweep: str, knob: str, value: Any) -> str:
    """The run folder name of one value: "<sweep>-<knob>-<value>" with every character outside letters, digits,
    '_', '-' and '.' turned into '_' (the Train node's run-name rule). A name over the length limit keeps its
    start and ends with 8 hex digits of the full name, so two long values never share a folder."""
    text = _NAME_CHARS.sub("_", value_text(value)).strip("._") or "value"
    name = f"{sweep}-{knob}-{text}"
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name.encode()[: MAX_NAME_BYTES - 9].decode(errors="ignore").rstrip("._-") + "-" + digest
    return safe_name(name, "sweep run name")


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its position, the knob's value, its label, its folder name and its settings."""

    index: int
    value: Any
    label: str
    name: str
    settings: TrainSettings


@dataclass(frozen=True)
class SweepPlan:
    name: str
    knob: str
    runs: tuple[SweepRun, ...]

    @property
    def values(self) -> tuple[Any, ...]:
        return tuple(r.value for r in self.runs)


def check_sweep_name(name: str) -> str:
    """The sweep name as a safe file name made only of letters, digits, '_', '-' and '.'."""
    name = safe_name(name, "sweep name")
    if _NAME_CHARS.search(name):
        raise SweepError(f"sweep name {name!r}: use letters, digits, '_', '-' and '.' (e.g. 'lr_sweep').")
    return name


def plan_sweep(name: str, knob: str, values: Sequence[Any], build: Callable[[Any], TrainSettings]) -> SweepPlan:
    """One run per value, in the order given; `build(value)` returns that run's settings (everything but the
    knob identical). Raises SweepError when a value is invalid or the built settings do not carry it."""
    name = check_sweep_name(name)
    runs = []
    for i, value in enumerate(values):
        try:
            settings = build(value)
        except SettingsError as err:
            raise SweepError(f"{label(knob, value)} (run {i + 1} of the sweep): {err}") from err
        if knob != PRESET_KNOB and getattr(settings, knob) != value:
            raise SweepError(
                f"{label(knob, value)}: the run would train with {knob}={getattr(settings, knob)!r} instead (0 keeps "
                f"the preset's value for rank, alpha, learning rate and steps): sweep other values."
            )
        runs.append(SweepRun(i, value, label(knob, value), run_name(name, knob, value), settings))
    names = [r.name for r in runs]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise SweepError(
            f"two values of {knob} give the same run name {clash!r}: make the values differ in letters or digits."
        )
    return SweepPlan(name, knob, tuple(runs))


# ------------------------------------------------------------------------------------------------ on disk


def run_status(folder: Path, steps: int) -> str:
    """FINISHED: a checkpoint at `steps` or later exists; PARTIAL: the run was started (run.json) but stopped
    earlier; MISSING: not started."""
    if not (folder / "run.json").is_file():
        return MISSING
    last = RunFolder.open(folder).latest_checkpoint()
    return FINISHED if last is not None and checkpoint_step(last) >= steps else PARTIAL


def statuses(runs_root: Path, plan: SweepPlan) -> list[str]:
    return [run_status(child_path(runs_root, r.name, what="sweep run"), r.settings.steps) for r in plan.runs]


def check_existing(runs_root: Path, plan: SweepPlan, resumable_changes: frozenset[str]) -> None:
    """Refuse a plan whose already-started runs were trained with other settings than the plan gives them
    (besides `resumable_changes`, e.g. more steps): queueing the sweep again must continue the same runs."""
    for run in plan.runs:
        folder = child_path(runs_root, run.name, what="sweep run")
        if not (folder / "run.json").is_file():
            continue
        old = RunFolder.open(folder).settings
        diff = {k: v for k, v in old.differences(run.settings).items() if k not in resumable_changes}
        diff.pop("validation_holdout", None)  # a resumed run keeps its own held-out share (the Train node's rule)
        if diff:
            listed = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SweepError(
                f"run '{run.name}' of sweep '{plan.name}' was trained with other settings ({listed}). Fix: put the "
                "settings back to continue the sweep, or give the sweep a new name."
            )


def manifest_path(runs_root: Path, name: str) -> Path:
    return child_path(runs_root, check_sweep_name(name) + MANIFEST_SUFFIX, what="sweep manifest")


def write_manifest(runs_root: Path, plan: SweepPlan, run_statuses: Sequence[str]) -> Path:
    """Write `<runs>/<name>.sweep.json` atomically: knob, values, and per run its label, folder, status and
    settings."""
    data = {
        "format": SWEEP_FORMAT,
        "name": plan.name,
        "knob": plan.knob,
        "values": list(plan.values),
        "runs": [
            {"label": r.label, "name": r.name, "value": r.value, "status": s, "settings": r.settings.to_dict()}
            for r, s in zip(plan.runs, run_statuses, strict=True)
        ],
    }
    path = manifest_path(runs_root, plan.name)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_manifest(runs_root: Path, name: str) -> dict[str, Any]:
    path = manifest_path(runs_root, name)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep '{name}' in {runs_root}: {path.name} is missing (train the sweep first).")
    data = json.loads(path.read_text())
    if data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {SWEEP_FORMAT!r}.")
    return data


# ------------------------------------------------------------------------------------------------ the socket


@dataclass(frozen=True)
class Sweep:
    """What a KLEIN_SWEEP socket carries: the sweep's name, knob, values, and per value its label and run
    folder name (in the order the values were typed)."""

    name: str
    knob: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    runs: tuple[str, ...]

    @classmethod
    def of(cls, plan: SweepPlan) -> Sweep:
        return cls(
            plan.name, plan.knob, plan.values, tuple(r.label for r in plan.runs), tuple(r.name for r in plan.runs)
        )

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> Sweep:
        runs = data["runs"]
        return cls(
            data["name"],
            data["knob"],
            tuple(r["value"] for r in runs),
            tuple(r["label"] for r in runs),
            tuple(r["name"] for r in runs),
        )
