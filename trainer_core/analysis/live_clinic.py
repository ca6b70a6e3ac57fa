"""The clinic, live: diagnostics measured at every validation of a training run, and the course's stop rules.

At each validation the Train node renders the validation prompts at one fixed seed. The base model's renders of
the same prompts and noise (the LoRA at step 0 is the base model: its B matrices start at zero) are the
reference, so `diagnostics.measure` reads each validation as ratios to the base, exactly as the Diagnose node
reads a checkpoint at scale 1:

  concept             album-like prompts with the trigger moved toward the album (0 = not yet, toward 1 = there);
  flexibility         how much different prompts still differ, relative to the base (the course's 3.2.1 chart);
  memorisation        the bicycle test: novel prompts' distance to the album relative to the base's;
  trigger_free_drift  prompts without the trigger moved toward the album (the concept leaks).

Which prompt tests what is read from the prompt itself (`prompt_group`): no trigger -> trigger-free; the trigger
with nothing but generic words around it ("a photo of TOK") -> album-like; the trigger in a scene the album
never showed ("TOK riding a bicycle") -> novel.

The stop rules of the course ("stop training if the concept appears without trigger, prompt changes stop
affecting output, or sample quality peaks then degrades") as measurable rules, checked at every validation:

  peak_then_stiffening  concept strength at >= NEAR_PEAK of its best so far while flexibility falls;
  memorised             the bicycle prompts at or below MEMORISED_BELOW of the base's distance to the album;
  leaks                 trigger-free drift at or above LEAK_ABOVE.

The first validation meeting a rule is the mark; the checkpoint to keep is the one the Sweet Spot node picks
from the same records (sweet_spot.suggest). Records live in `<run>/clinic.jsonl` (one JSON object per line),
so a reloaded page and the Sweet Spot node read the same numbers. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..lora.lora_file import atomic_write_bytes
from .diagnostics import GROUPS, LEAK_ABOVE, MEMORISED_BELOW, TIMID_BELOW, Renders, clinic, latent_features, measure
from .sweet_spot import NEAR_PEAK, suggest

CLINIC_FILE = "clinic.jsonl"
FLEX_FALL = 0.02  # flexibility must drop by more than this between validations to count as falling (render noise)
# Words that say nothing about the scene: a trigger prompt made only of these is album-like.
GENERIC_WORDS = frozenset(
    "a an the of in on with and photo photograph picture image portrait painting drawing illustration style "
    "closeup close-up shot render artwork art".split()
)
RULES = {
    "peak_then_stiffening": "concept strength near its best while prompt flexibility falls",
    "memorised": "the bicycle prompts hand the album back (memorisation)",
    "leaks": "the concept appears without the trigger",
}


def prompt_group(prompt: str, trigger: str) -> str:
    """'trigger_free', 'trigger' (album-like) or 'novel' (the bicycle test) for one validation prompt."""
    words = re.findall(r"[\w-]+", prompt.lower())
    if not trigger or trigger.lower() not in words:
        return "trigger_free"
    others = [w for w in words if w != trigger.lower() and w not in GENERIC_WORDS]
    return "novel" if others else "trigger"


def prompt_groups(prompts: Sequence[str], trigger: str) -> dict[str, list[int]]:
    """group -> row indices of `prompts` (every group present, maybe empty)."""
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, prompt in enumerate(prompts):
        groups[prompt_group(prompt, trigger)].append(i)
    return groups


def clinic_possible(prompts: Sequence[str], trigger: str) -> bool:
    """At least two prompts (flexibility compares different prompts) and at least one prompt with the trigger."""
    groups = prompt_groups(prompts, trigger)
    return len(prompts) >= 2 and bool(groups["trigger"] or groups["novel"])


def measure_validation(
    step: int,
    latents: Tensor,
    base_latents: Tensor,
    album_latents: Sequence[Tensor],
    groups: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """One clinic record of a validation: latents [P, 128, h, w] of the P prompts now and of the base model,
    the album's latents (any sizes). Latent space only: the album is held as latents during training."""
    album = Renders(latent_features(album_latents))
    found = measure(Renders(latent_features(latents)), Renders(latent_features(base_latents)), album, groups)
    record: dict[str, Any] = {"step": int(step)}
    for key in ("concept", "flexibility", "memorisation", "trigger_free_drift", "change"):
        value = found.get(key)
        record[key] = float(value) if value is not None and math.isfinite(value) else None
    record["findings"] = clinic(record)
    return record


# ---------------------------------------------------------------------------------------------- the file


def clinic_path(run_path: str | os.PathLike[str]) -> Path:
    return Path(run_path) / CLINIC_FILE


def append_clinic(run_path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record (a single O_APPEND write)."""
    line = (json.dumps(dict(record), sort_keys=True) + "\n").encode()
    fd = os.open(clinic_path(run_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_clinic(run_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record, later records of a step replacing earlier ones; a torn line (a crash mid-write) is skipped."""
    path = clinic_path(run_path)
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def truncate_clinic(run_path: str | os.PathLike[str], step: int) -> None:
    """Keep the records up to `step` (a resumed run continues from that checkpoint)."""
    if not clinic_path(run_path).is_file():
        return
    kept = [r for r in read_clinic(run_path) if r["step"] <= step]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    atomic_write_bytes(clinic_path(run_path), text.encode())


# ---------------------------------------------------------------------------------------------- the mark


@dataclass(frozen=True)
class StopMark:
    """The first validation that met a stop rule, the rule, the reason in words and the step to keep."""

    step: int
    rule: str
    reason: str
    keep_step: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(record: Mapping[str, Any], key: str) -> float | None:
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def rule_met(records: Sequence[Mapping[str, Any]], index: int) -> tuple[str, str] | None:
    """(rule, reason) when record `index` (records in step order) meets a stop rule, else None."""
    r = records[index]
    memo, leak = _value(r, "memorisation"), _value(r, "trigger_free_drift")
    if memo is not None and memo <= MEMORISED_BELOW:
        return "memorised", f"bicycle prompts at {memo:.2f} of the base's distance to the album (≤ {MEMORISED_BELOW})"
    if leak is not None and leak >= LEAK_ABOVE:
        return "leaks", f"trigger-free drift {leak:.2f} (≥ {LEAK_ABOVE})"
    concept, flex = _value(r, "concept"), _value(r, "flexibility")
    earlier = [c for c in (_value(x, "concept") for x in records[: index + 1]) if c is not None]
    prev_flex = _value(records[index - 1], "flexibility") if index > 0 else None
    if concept is None or flex is None or prev_flex is None or not earlier:
        return None
    best = max(earlier)
    if best >= TIMID_BELOW and concept >= NEAR_PEAK * best and flex < prev_flex - FLEX_FALL:
        return (
            "peak_then_stiffening",
            f"concept strength {concept:.2f} (best {best:.2f}) while flexibility fell {prev_flex:.2f} → {flex:.2f}",
        )
    return None


def keep_step(records: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]] = ()) -> int:
    """The step the Sweet Spot node picks from these records (each read as one checkpoint at scale 1)."""
    diag = [dict(r, scale=1.0) for r in records]
    return suggest(diag, metrics, [int(r["step"]) for r in records]).step


def find_mark(records: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]] = ()) -> StopMark | None:
    """The first record (step order) meeting a stop rule, with the step to keep chosen from the records so far."""
    ordered = sorted(records, key=lambda r: int(r["step"]))
    for i in range(len(ordered)):
        met = rule_met(ordered, i)
        if met is not None:
            rule, reason = met
            return StopMark(int(ordered[i]["step"]), rule, reason, keep_step(ordered[: i + 1], metrics))
    return None


class LiveClinic:
    """The clinic records of a run as they arrive, the mark, and the auto-stop (`stop_after` validations after
    the mark; None = off)."""

    def __init__(self, records: Sequence[Mapping[str, Any]] = (), stop_after: int | None = None) -> None:
        if stop_after is not None and stop_after < 0:
            raise ValueError(f"stop_after={stop_after}: use 0 (stop at the mark) or more validations, or None (off).")
        self.records: list[dict[str, Any]] = [dict(r) for r in records]
        self.stop_after = stop_after
        self.mark = find_mark(self.records)

    def add(self, record: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]] = ()) -> StopMark | None:
        """Add a validation's record; returns the mark when this record set it (None otherwise)."""
        self.records.append(dict(record))
        if self.mark is not None:
            return None
        self.mark = find_mark(self.records, metrics)
        return self.mark

    def validations_since_mark(self) -> int:
        if self.mark is None:
            return -1
        return sum(1 for r in self.records if int(r["step"]) > self.mark.step)

    def should_stop(self) -> bool:
        return (
            self.stop_after is not None and self.mark is not None and self.validations_since_mark() >= self.stop_after
        )
