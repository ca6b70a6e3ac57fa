"""Sweet-spot choice on constructed metric curves: the pick, the clinic's reason words, the curves it used (never
hidden), the fallbacks (all timid, all memorised, loss only), the diagnostics file merge and the chart."""

from __future__ import annotations

import numpy as np
import pytest
from klein_lora_lab.trainer_core.analysis.sweet_spot import (
    COLOURS,
    DIAGNOSTICS_FILE,
    read_diagnostics,
    render_sweet_spot,
    suggest,
    write_diagnostics,
)

STEPS = (100, 200, 300, 400, 500, 600, 700, 800)
SCALES = (0.5, 1.0, 2.0, 4.0)


def arc(step: int, scale: float) -> dict:
    """A learning arc driven by the dose k = step/100 · scale: the concept arrives (timid below k ≈ 0.8) and
    saturates at 0.6 from k = 5; novel prompts start coming back as album images from k = 3 (memorised at
    k ≥ 6.3); flexibility falls from k = 4 (collapsed at k ≥ 6.5); trigger-free drift grows slowly."""
    k = step / 100 * scale
    return {
        "step": step,
        "scale": scale,
        "concept": min(0.6, 0.12 * k),
        "memorisation": 1.0 if k <= 3 else 1.0 - 0.15 * (k - 3),
        "flexibility": 1.0 if k <= 4 else 1.0 - 0.2 * (k - 4),
        "trigger_free_drift": 0.02 * k,
    }


def records(fn=arc) -> list[dict]:
    return [fn(s, c) for s in STEPS for c in SCALES]


def test_arc_picks_peak_before_memorisation():
    """Near-peak healthy records at scale 1 exist (steps 500, 600): the earliest one is picked; the reasons
    name the clinic's words for what comes before and after, at this scale and along the scale slider."""
    spot = suggest(records())
    assert (spot.step, spot.scale, spot.verdict) == (500, 1.0, "healthy")
    text = spot.text()
    assert "underfit/timid at scale 1 up to step" not in text  # step 100 at scale 1 already has concept 0.12
    assert "overfit/memorised from step 700 on at scale 1" in text
    assert "too strong/caricature above scale" in text and "overfit/memorised above scale" in text


def test_caricature_without_memorisation():
    """Flexibility collapses while novel prompts never return album images: the clinic's too strong/caricature
    is named along the arc (from step 700 at scale 1) and the pick stays before it."""
    spot = suggest(records(lambda s, c: dict(arc(s, c), memorisation=1.0)))
    assert (spot.step, spot.scale) == (500, 1.0)
    assert "too strong/caricature from step 700 on at scale 1" in spot.text()
    assert "overfit/memorised" not in spot.text()


def test_curves_are_returned_not_hidden():
    """The curves the choice used come back whole: by step at the chosen scale (every step), by scale at the
    chosen step (every scale), the validation loss as given."""
    metrics = [{"step": s, "loss": 0.5, "val_loss": 0.4 - 0.0001 * s} for s in STEPS]
    spot = suggest(records(), metrics)
    by_step, by_scale = spot.curves["by_step"], spot.curves["by_scale"]
    assert by_step["steps"] == list(STEPS) and by_step["scale"] == 1.0
    assert by_step["concept"] == [arc(s, 1.0)["concept"] for s in STEPS]
    assert by_step["memorisation"] == [arc(s, 1.0)["memorisation"] for s in STEPS]
    assert by_scale["scales"] == list(SCALES) and by_scale["step"] == 500
    assert by_scale["flexibility"] == [arc(500, c)["flexibility"] for c in SCALES]
    assert spot.curves["val_loss"] == {"steps": list(STEPS), "values": [m["val_loss"] for m in metrics]}


def test_all_timid_says_train_longer():
    """A LoRA that never brings the concept: the strongest record, verdict underfit/timid, 'train longer'."""
    spot = suggest(records(lambda s, c: dict(arc(s, c), concept=0.00002 * s * c, memorisation=1.0, flexibility=1.0)))
    assert spot.verdict == "underfit/timid" and (spot.step, spot.scale) == (800, 4.0)
    assert "Train longer" in spot.text()


def test_all_memorised_says_overfit():
    """Every checkpoint hands the album back: the least failing record, verdict overfit/memorised, and the fix
    (fewer steps, lower learning rate, a more varied album)."""
    spot = suggest(records(lambda s, c: dict(arc(s, c), memorisation=0.3 - 0.0001 * s * c)))
    assert spot.verdict == "overfit/memorised" and (spot.step, spot.scale) == (100, 0.5)
    assert "fewer steps" in spot.text()


def test_leaking_records_are_avoided_when_possible():
    """Among near-peak records one that leaks without trigger is passed over for one that does not."""
    rows = records(lambda s, c: dict(arc(s, c), trigger_free_drift=0.5 if (s, c) == (500, 1.0) else 0.0))
    spot = suggest(rows)
    assert (spot.step, spot.scale) == (600, 1.0) and spot.verdict == "healthy"


def test_loss_only_and_nothing():
    """Without diagnostics: the checkpoint nearest the validation-loss minimum at scale 1, saying loss cannot see
    memorisation; without anything: the last checkpoint, saying what to run; without checkpoints: an error."""
    metrics = [{"step": s, "val_loss": (s - 280) ** 2 / 1e5 + 0.2} for s in STEPS]
    spot = suggest([], metrics, checkpoint_steps=[100, 400, 800])
    assert (spot.step, spot.scale, spot.verdict) == (400, 1.0, "by validation loss only")
    assert "lowest at step 300" in spot.text() and "Diagnose" in spot.text()
    assert suggest([], [], [200, 400]).step == 400
    with pytest.raises(ValueError, match="no checkpoints"):
        suggest([], [], [])


def test_validation_rise_is_reported():
    """A validation loss that bottoms out and climbs again gets a plain-word line."""
    metrics = [{"step": s, "val_loss": 0.3 if s == 300 else 0.4} for s in STEPS]
    assert "lowest at step 300" in suggest(records(), metrics).text()
    assert "generalise" in suggest(records(), metrics).text()


def test_diagnostics_file_merges_same_config_replaces_other(tmp_path):
    """Passes with the same config add up (a re-measured record replaces its old one); another config starts
    the file over."""
    config = {"seed": 1, "prompts": {"novel": ["a photo of TOK riding a bicycle"]}}
    write_diagnostics(tmp_path, config, [arc(100, 1.0), arc(200, 1.0)])
    write_diagnostics(tmp_path, config, [dict(arc(200, 1.0), concept=0.99), arc(300, 1.0)])
    data = read_diagnostics(tmp_path)
    assert [(r["step"], r["concept"]) for r in data["records"]] == [
        (100, 0.12),
        (200, 0.99),
        (300, pytest.approx(0.36)),
    ]
    write_diagnostics(tmp_path, dict(config, seed=2), [arc(400, 1.0)])
    assert [r["step"] for r in read_diagnostics(tmp_path)["records"]] == [400]
    assert (tmp_path / DIAGNOSTICS_FILE).is_file() and read_diagnostics(tmp_path / "nothing") is None


def test_chart_draws_curves_and_pick():
    """The chart has the asked size and shows each measure's colour and the white pick line."""
    metrics = [{"step": s, "val_loss": 0.4 - 0.0001 * s} for s in STEPS]
    img = render_sweet_spot(suggest(records(), metrics), 800, 360, title="run")
    assert img.size == (800, 360)
    pixels = np.asarray(img).reshape(-1, 3)
    for key in ("concept", "flexibility", "memorisation", "val_loss", "pick"):
        assert (np.abs(pixels.astype(int) - COLOURS[key]).max(axis=1) <= 4).any(), key
    with pytest.raises(ValueError, match="at least"):
        render_sweet_spot(suggest(records()), 100, 100)
