"""One diagnosis pass through trainer_core with stand-in rendering: the plan follows the widgets, the sampler is
asked for the base then every checkpoint × scale, each (checkpoint, scale) gets a record with the clinic's
verdict, and the pass lands in diagnostics.json with a sweet-spot suggestion."""

from __future__ import annotations

import pytest
import torch
from klein_lora_lab.trainer_core.analysis.diagnose import DiagnosisPlan, diagnose, diagnosis_plan, record_diagnosis
from klein_lora_lab.trainer_core.analysis.sweet_spot import read_diagnostics
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.settings import TrainSettings

TEXTS = {"trigger": "a photo of [trigger]\nTOK portrait", "novel": "[trigger] on a bicycle", "trigger_free": "a bowl"}


def _latent(seed: int, size: int = 4) -> torch.Tensor:
    return torch.randn(128, size, size, generator=torch.Generator().manual_seed(seed))


def _decode(latents: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE: [n, 128, h, w] -> [n, 4h, 4w, 3] in 0..1 (pixels follow the latent)."""
    return torch.sigmoid(latents[:, :3]).repeat_interleave(4, 2).repeat_interleave(4, 3).permute(0, 2, 3, 1)


ALBUM = [_latent(1000 + i) for i in range(3)] + [_latent(2000, size=6)]  # two latent sizes


def test_plan_reads_the_widgets() -> None:
    """'[trigger]' becomes the run's trigger, groups index the prompt rows, scale 0 is dropped (the base is
    always rendered), and a selection without positive scales is refused with the fix."""
    plan = diagnosis_plan(TEXTS, "TOK", "last 2", [100, 200, 300], "0,1,2")
    assert plan.prompts == ["a photo of TOK", "TOK portrait", "TOK on a bicycle", "a bowl"]
    assert plan.groups == {"trigger": [0, 1], "novel": [2], "trigger_free": [3]}
    assert plan.steps == [200, 300] and plan.scales == [1.0, 2.0]
    with pytest.raises(ValueError, match="no scale above 0"):
        diagnosis_plan(TEXTS, "TOK", "all", [100], "0")


def test_pass_measures_every_checkpoint_and_scale_and_records_it(tmp_path) -> None:
    """The sampler gets base + every (step, scale) in order; a checkpoint that hands the album back on the
    bicycle prompt is found memorised, one that renders like the base is not; the records and the album
    decodes (one call per latent size) reach diagnostics.json and the report."""
    plan = DiagnosisPlan(
        [100, 200],
        [1.0],
        ["TOK", "TOK portrait", "TOK on a bicycle", "a bowl"],
        dict(trigger=[0, 1], novel=[2], trigger_free=[3]),
    )
    asked: list = []
    decoded_shapes: list = []

    def sample(combos):
        asked.extend(combos)
        out = []
        for step, _scale in combos:
            for p in range(len(plan.prompts)):
                memorised = step == 200 and p in (0, 1, 2)
                out.append(ALBUM[p % 3] + 0.01 * _latent(50 + p) if memorised else _latent(p))
        return torch.stack(out)

    def decode(latents):
        decoded_shapes.append(tuple(latents.shape))
        return _decode(latents)

    names = {100: "run/checkpoints/step_000100.safetensors", 200: "run/checkpoints/step_000200.safetensors"}
    result = diagnose(plan, sample, decode, ALBUM, names)
    assert asked == [(None, 0.0), (100, 1.0), (200, 1.0)]
    assert result.images.shape == (12, 16, 16, 3)
    assert [(r["step"], r["scale"], r["lora"]) for r in result.records] == [
        (100, 1.0, names[100]),
        (200, 1.0, names[200]),
    ]
    assert "overfit/memorised" not in result.records[0]["findings"]
    assert "overfit/memorised" in result.records[1]["findings"]
    assert sorted(decoded_shapes[1:]) == [(1, 128, 6, 6), (3, 128, 4, 4)]  # the album, one call per size

    run = RunFolder.create(tmp_path / "run", TrainSettings(rank=2, alpha=2, steps=200), {"album_hash": "other"})
    for step in (100, 200):
        run.checkpoint_path(step).parent.mkdir(parents=True, exist_ok=True)
        run.checkpoint_path(step).write_bytes(b"")
    text, spot = record_diagnosis(run, plan, result, {"seed": 0}, "album-1")
    stored = read_diagnostics(run.path)
    assert [r["step"] for r in stored["records"]] == [100, 200]
    assert stored["config"]["prompts"]["novel"] == ["TOK on a bicycle"] and stored["config"]["album_hash"] == "album-1"
    assert spot.step in (100, 200) and "is not the album this run trained on" in text
    assert "step 200 · scale 1" in text and "overfit/memorised" in text
