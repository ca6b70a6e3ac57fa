"""The live clinic (trainer_core/analysis/live_clinic.py): prompt groups, measures per validation, the course's
stop rules, the mark, the auto-stop and the clinic file."""

from __future__ import annotations

import json

import pytest
from harness.clinic import constructed_run
from klein_lora_lab.trainer_core.analysis.live_clinic import (
    LiveClinic,
    append_clinic,
    find_mark,
    prompt_group,
    prompt_groups,
    read_clinic,
    truncate_clinic,
)
from klein_lora_lab.trainer_core.analysis.sweet_spot import suggest


def test_prompt_groups_read_from_the_words() -> None:
    """The default validation prompts fall in the three clinic groups: the trigger with generic words is
    album-like, the trigger in a new scene is the bicycle test, no trigger is trigger-free."""
    assert prompt_group("a photo of TOK", "TOK") == "trigger"
    assert prompt_group("TOK", "TOK") == "trigger"
    assert prompt_group("a photo of TOK riding a bicycle", "TOK") == "novel"
    assert prompt_group("a photo of a bicycle leaning against a brick wall", "TOK") == "trigger_free"
    assert prompt_group("a TOKEN of luck", "TOK") == "trigger_free"  # a word containing the trigger is not it
    groups = prompt_groups(["a photo of TOK", "TOK riding a bicycle", "a bowl of fruit"], "TOK")
    assert groups == {"trigger": [0], "novel": [1], "trigger_free": [2]}


def test_collapse_onto_the_album_is_marked_at_its_step() -> None:
    """Bicycle prompts that hand the album back from step 400 on: memorisation drops to 0 there, the mark is at
    400 with the memorisation rule, and the step to keep is the Sweet Spot node's pick from the same records."""
    steps = [100, 200, 300, 400, 500, 600]
    records = constructed_run(400, steps)
    by_step = {r["step"]: r for r in records}
    assert by_step[300]["memorisation"] == pytest.approx(1.0, abs=1e-6)
    assert by_step[400]["memorisation"] == pytest.approx(0.0, abs=1e-6)
    assert by_step[400]["findings"][0] == "overfit/memorised"
    assert all(by_step[s]["trigger_free_drift"] == pytest.approx(0.0, abs=1e-6) for s in steps)
    mark = find_mark(records)
    assert mark is not None and mark.step == 400 and mark.rule == "memorised"
    expected = suggest([dict(r, scale=1.0) for r in records if r["step"] <= 400], (), steps).step
    assert mark.keep_step == expected and mark.keep_step < 400


def test_peak_then_stiffening_rule() -> None:
    """Concept strength near its best while flexibility falls by more than the noise margin marks the step; a
    flexibility dip while the concept is still far from its best does not."""
    concept = [0.05, 0.30, 0.50, 0.52, 0.50]
    flex = [1.00, 0.90, 0.99, 0.90, 0.80]  # the dip at step 200 comes while the concept is still rising past 0.3
    records = [
        {"step": 100 * (i + 1), "concept": c, "flexibility": f, "memorisation": 0.9, "trigger_free_drift": 0.0}
        for i, (c, f) in enumerate(zip(concept, flex, strict=True))
    ]
    # step 200: concept 0.30 is the best so far and flexibility fell 1.0 -> 0.9: that is a mark by the rule.
    mark = find_mark(records)
    assert mark is not None and mark.rule == "peak_then_stiffening" and mark.step == 200
    # With flexibility steady until step 400 the mark moves there, and the pick is the earliest near-peak record.
    steady = [dict(r, flexibility=f) for r, f in zip(records, [1.0, 1.0, 0.99, 0.90, 0.80], strict=True)]
    mark = find_mark(steady)
    assert mark.step == 400 and mark.keep_step == 300


def test_leak_rule_and_no_mark_when_healthy() -> None:
    """Trigger-free drift at the threshold marks the step; a run that stays healthy gets no mark."""
    healthy = [
        {"step": s, "concept": 0.2 + 0.01 * s / 100, "flexibility": 1.0, "memorisation": 0.9, "trigger_free_drift": 0.1}
        for s in (100, 200, 300)
    ]
    assert find_mark(healthy) is None
    leaking = [*healthy, {**healthy[-1], "step": 400, "trigger_free_drift": 0.35}]
    mark = find_mark(leaking)
    assert mark.step == 400 and mark.rule == "leaks"


def test_auto_stop_counts_validations_after_the_mark() -> None:
    """stop_after=0 stops at the mark, 1 one validation later; None never stops."""
    records = constructed_run(400, [100, 200, 300, 400, 500, 600])
    for stop_after, stop_step in ((0, 400), (1, 500), (None, None)):
        live = LiveClinic(stop_after=stop_after)
        stopped_at = None
        for r in records:
            live.add(r)
            if live.should_stop():
                stopped_at = r["step"]
                break
        assert stopped_at == stop_step, stop_after
        assert live.mark.step == 400
    with pytest.raises(ValueError, match="stop_after=-1"):
        LiveClinic(stop_after=-1)


def test_clinic_file_round_trip_truncate_and_torn_line(tmp_path) -> None:
    """Records append one per line, read back in step order (a later record of a step wins), a torn last line
    is skipped, and truncating for a resume keeps the records up to the checkpoint."""
    for step in (200, 100, 300):
        append_clinic(tmp_path, {"step": step, "concept": step / 1000})
    append_clinic(tmp_path, {"step": 200, "concept": 0.9})
    with open(tmp_path / "clinic.jsonl", "a") as f:
        f.write('{"step": 400, "conc')
    records = read_clinic(tmp_path)
    assert [r["step"] for r in records] == [100, 200, 300] and records[1]["concept"] == 0.9
    truncate_clinic(tmp_path, 200)
    lines = (tmp_path / "clinic.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [100, 200]
    assert read_clinic(tmp_path / "missing") == []
