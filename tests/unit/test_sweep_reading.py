"""The sweep-level reading and the all-runs loss chart, from constructed run evidence (no ComfyUI)."""

from __future__ import annotations

import numpy as np
import pytest
from klein_lora_lab.trainer_core.analysis.loss_curve import history_from_records
from klein_lora_lab.trainer_core.analysis.sweep_reading import (
    RUN_COLOURS,
    RunEvidence,
    read_run,
    read_sweep,
    render_sweep_curves,
)

STEPS = [200, 400, 600, 800, 1000]


def diag(step: int, scale: float, concept: float, memo: float = 1.0, flex: float = 1.0) -> dict:
    return {"step": step, "scale": scale, "concept": concept, "memorisation": memo, "flexibility": flex}


def evidence(label: str, records: list[dict], losses=None, val=None) -> RunEvidence:
    metrics = [{"step": s, "loss": v} for s, v in enumerate(losses or [0.5, 0.4, 0.3], start=1)]
    for s, v in val or []:
        metrics.append({"step": s, "val_loss": v})
    return RunEvidence(label, metrics, records, STEPS, history_from_records(metrics, STEPS))


def test_the_three_learning_rates_read_like_the_lab() -> None:
    """Frantic memorises from the first step where the bicycle prompts come back; timid never reaches the concept;
    the default has a healthy sweet spot at scale 1 (the earliest checkpoint near the peak concept)."""
    frantic = evidence(
        "learning_rate=0.0002", [diag(s, 1.0, 0.8, memo=0.9 if s < 600 else 0.3, flex=0.9) for s in STEPS]
    )
    timid = evidence("learning_rate=1e-05", [diag(s, 1.0, 0.02 + s / 100000) for s in STEPS])
    default = evidence("learning_rate=5e-05", [diag(s, 1.0, min(0.9, s / 900), memo=0.9) for s in STEPS])
    assert read_run(frantic) == ("learning_rate=0.0002: sweet spot at step 200, scale 1; memorised from step 600")
    assert read_run(timid).startswith("learning_rate=1e-05: still timid at step 1000 (scale 1)")
    assert read_run(default) == "learning_rate=5e-05: sweet spot at step 800, scale 1"
    all_memorised = evidence("lr=1", [diag(s, 1.0, 0.8, memo=0.2) for s in STEPS])
    assert read_run(all_memorised).startswith("lr=1: memorised from step 200 (scale 1)")


def test_reading_without_diagnostics_uses_the_validation_loss() -> None:
    """Without diagnostics: a validation loss still falling reads 'train longer'; one that rose after its minimum
    names the step; the comparison names the lowest validation loss; runs lacking the prompt tests are listed."""
    falling = evidence("rank=8", [], val=[(200, 0.5), (400, 0.4), (600, 0.3)])
    rising = evidence("rank=32", [], val=[(200, 0.5), (400, 0.2), (600, 0.4)])
    assert "still falling at step 600" in read_run(falling)
    assert read_run(rising).startswith("rank=32: validation loss lowest at step 400 (0.2), 100% higher by step 600")
    lines = read_sweep("rank", [falling, rising])
    assert lines[2] == "lowest validation loss of the sweep over rank: rank=32 (0.2 at step 400)"
    assert "no diagnostics yet for rank=8, rank=32" in lines[3]
    assert read_run(evidence("rank=4", [])).startswith("rank=4: smoothed loss")


@pytest.mark.parametrize("runs", [1, 3, 9])
def test_chart_draws_every_run_in_its_colour(runs: int) -> None:
    """Every run's curve appears in its own colour (colours repeat after the palette), at the requested size."""
    evidences = [
        evidence(f"seed={i}", [], losses=list(np.linspace(1.0, 0.2 + 0.05 * i, 50)), val=[(10, 0.9), (40, 0.5)])
        for i in range(runs)
    ]
    img = render_sweep_curves(evidences, 640, 360, 0.5, "sweep")
    assert img.size == (640, 360)
    pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
    for i in range(min(runs, len(RUN_COLOURS))):
        assert RUN_COLOURS[i] in pixels, i


def test_chart_without_losses_says_so() -> None:
    """An empty sweep chart is drawn (not an error), and a too-small size is refused with the minimum."""
    assert render_sweep_curves([RunEvidence("lr=1")]).size == (960, 480)
    with pytest.raises(ValueError, match="at least 300×160"):
        render_sweep_curves([], 100, 100)
