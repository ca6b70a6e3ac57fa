"""Preservation (trigger-free captions held at the base model's prediction) and the per-image loss records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness.callbacks import StopAt
from harness.preservation import SPEC, constructed_album
from klein_lora_lab.trainer_core.lora.adapters import LoraTrainable
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem, pad_context
from klein_lora_lab.trainer_core.training.options import TrainingOptions, with_options
from klein_lora_lab.trainer_core.training.preservation import preservation_loss
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from klein_lora_lab.trainer_core.training.trainer import train

BASE = dict(rank=4, alpha=4, learning_rate=1e-2, steps=6, checkpoint_every=3, save_dtype="fp32", targets="regex:.*")


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_σ, σ, trigger-free contexts) of the constructed album's first items."""
    album = constructed_album()
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(batch, 128, 4, 4, generator=g)
    ctx = torch.stack([pad_context(item.free_context) for item in album.items[:batch]])
    return x_t, torch.tensor([0.3, 0.8][:batch]), ctx


def _lora(model, seed: int = 0, up_scale: float = 0.0) -> LoraTrainable:
    lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(seed))
    if up_scale:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in lora.up.values():
                p.copy_(torch.randn(p.shape, generator=g) * up_scale)
    return lora


def test_preservation_is_exactly_zero_with_adapters_off_or_a_fresh_lora() -> None:
    """With the adapters off (or a LoRA whose B is still 0) the adapted prediction is the base prediction, so the
    preservation loss is exactly 0: preservation pulls nothing the LoRA did not change."""
    model = tiny_klein(SPEC)
    x_t, sigma, ctx = _inputs()
    assert preservation_loss(model, x_t, sigma, ctx, None).item() == 0.0
    assert preservation_loss(model, x_t, sigma, ctx, _lora(model)).item() == 0.0


def test_preservation_pulls_a_changed_trigger_free_prediction_back() -> None:
    """A LoRA that changes the trigger-free prediction has a positive preservation loss, and training on that loss
    alone brings its prediction back to the base model's (the loss falls below a tenth of where it started)."""
    model = tiny_klein(SPEC)
    x_t, sigma, ctx = _inputs()
    lora = _lora(model, up_scale=1.0)
    start = preservation_loss(model, x_t, sigma, ctx, lora).item()
    assert start > 1e-4
    opt = torch.optim.Adam(lora.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        preservation_loss(model, x_t, sigma, ctx, lora).backward()
        opt.step()
    end = preservation_loss(model, x_t, sigma, ctx, lora).item()
    assert end < 0.1 * start
    with torch.no_grad():
        base = klein_forward(model, x_t, sigma, ctx)
        now = klein_forward(model, x_t, sigma, ctx, adapters=lora)
    assert (now - base).square().mean().item() == pytest.approx(end, rel=1e-4)


def _free_drift(model, album, lora) -> float:
    """Mean squared change of the velocity on the trigger-free captions, over fixed noise and σ."""
    g = torch.Generator().manual_seed(5)
    ctx = torch.stack([pad_context(item.free_context) for item in album.items])
    x_t = torch.randn(len(album.items), 128, 4, 4, generator=g)
    sigma = torch.linspace(0.2, 0.9, len(album.items))
    with torch.no_grad():
        return (
            (klein_forward(model, x_t, sigma, ctx, adapters=lora) - klein_forward(model, x_t, sigma, ctx))
            .square()
            .mean()
            .item()
        )


def test_training_with_preservation_keeps_trigger_free_captions_nearer_the_base(tmp_path: Path) -> None:
    """Trained on the same captions with the trigger, a run with preservation changes the trigger-free
    captions' prediction far less than a run without, while it learns the album about as well (training loss)."""
    album = constructed_album()
    drift, final = {}, {}
    for weight in (0.0, 1.0):
        model = tiny_klein(SPEC)
        s = TrainSettings(**{**BASE, "steps": 30, "checkpoint_every": 0}, batch_size=3, preservation_weight=weight)
        run = RunFolder.create(tmp_path / f"w{weight}", s, {})
        result = train(model, album.items, s, run)
        drift[weight] = _free_drift(model, album, result.lora)
        final[weight] = sum(r["loss"] for r in run.read_metrics()[-10:]) / 10
        kept = [r for r in run.read_metrics() if "preservation_loss" in r]
        assert (len(kept) > 0) == (weight > 0)  # the metrics say when preservation ran
    assert drift[1.0] < 0.5 * drift[0.0]
    assert final[1.0] < 1.1 * final[0.0]


def test_preservation_resumes_bit_identical_and_preserves_on_a_share_of_steps(tmp_path: Path) -> None:
    """Which steps preserve is drawn from the seed: a run stopped and resumed preserves on the same steps and ends
    with the same losses and weights as one that never stopped; share 0.5 preserves on some steps, not all."""
    album = constructed_album()
    s = TrainSettings(**{**BASE, "steps": 10, "checkpoint_every": 2}, preservation_weight=0.7, preservation_share=0.5)
    full_run = RunFolder.create(tmp_path / "full", s, {})
    full = train(tiny_klein(SPEC), album.items, s, full_run)
    part_run = RunFolder.create(tmp_path / "part", s, {})
    train(tiny_klein(SPEC), album.items, s, part_run, StopAt(4))
    resumed = train(tiny_klein(SPEC), album.items, s, RunFolder.open(tmp_path / "part"), resume=True)

    def without_time(run: RunFolder) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in run.read_metrics()]

    records = without_time(full_run)
    assert without_time(RunFolder.open(tmp_path / "part")) == records
    preserved = sum("preservation_loss" in r for r in records)
    assert 0 < preserved < len(records)
    for name, w in full.lora.weights().items():
        assert torch.equal(w.up, resumed.lora.weights()[name].up)


def test_preservation_without_trigger_free_contexts_asks_to_re_encode(tmp_path: Path) -> None:
    """Items encoded before preservation existed (no trigger-free context) train as before with preservation off
    and refuse preservation with the fix: encode the album again."""
    items = [TrainItem(item.latent, item.context, name=item.name) for item in constructed_album().items]
    off = TrainSettings(**BASE)
    train(tiny_klein(SPEC), items, off, RunFolder.create(tmp_path / "off", off, {}))
    on = TrainSettings(**BASE, preservation_weight=1.0)
    with pytest.raises(ValueError, match="Klein Encode Dataset"):
        train(tiny_klein(SPEC), items, on, RunFolder.create(tmp_path / "on", on, {}))


def test_preservation_settings_are_validated_stored_and_old_runs_read_as_off(tmp_path: Path) -> None:
    """The weight and share are checked with the fix in the message, survive run.json, come from the Training
    Options node, and a run.json written before they existed opens with preservation off."""
    with pytest.raises(SettingsError, match="preservation_weight"):
        TrainSettings(preservation_weight=-1)
    with pytest.raises(SettingsError, match="preservation_share"):
        TrainSettings(preservation_weight=1.0, preservation_share=0.0)
    s = with_options(TrainSettings(), TrainingOptions(preservation=0.8, preservation_share=0.25))
    assert (s.preservation_weight, s.preservation_share) == (0.8, 0.25)
    run = RunFolder.create(tmp_path / "new", s, {})
    assert RunFolder.open(run.path).settings == s
    old = json.loads((run.path / "run.json").read_text())
    for key in ("preservation_weight", "preservation_share"):
        del old["settings"][key]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps(old))
    assert RunFolder.open(tmp_path / "old").settings.preservation_weight == 0.0


def test_per_image_losses_are_recorded_at_each_validation_and_cut_on_resume(tmp_path: Path) -> None:
    """Every validation appends one per_image.jsonl record with each album item's loss now and the base model's
    (the same every time), named by file; a resume drops the records of the steps it trains again."""
    album = constructed_album()
    s = TrainSettings(**{**BASE, "steps": 6, "checkpoint_every": 2}, validation_every=2)
    run = RunFolder.create(tmp_path / "run", s, {})
    train(tiny_klein(SPEC), album.items, s, run, StopAt(5))
    records = RunFolder.open(run.path).read_per_image()
    assert [r["step"] for r in records] == [2, 4]
    names = [item.name for item in album.items]
    for record in records:
        assert [i["name"] for i in record["items"]] == names
        assert all(i["loss"] > 0 and i["base_loss"] > 0 and not i["held_out"] for i in record["items"])
    assert [i["base_loss"] for i in records[0]["items"]] == [i["base_loss"] for i in records[1]["items"]]
    assert [i["loss"] for i in records[0]["items"]] != [i["loss"] for i in records[1]["items"]]
    # Stopped at 5: the checkpoint of step 5 is the resume point, so nothing is cut; resume and finish.
    train(tiny_klein(SPEC), album.items, s, RunFolder.open(run.path), resume=True)
    assert [r["step"] for r in RunFolder.open(run.path).read_per_image()] == [2, 4, 6]
    # Resuming from step 4 (the newer checkpoints gone) drops the record of step 6.
    for step in (5, 6):
        RunFolder.open(run.path).checkpoint_path(step).unlink()
    longer = TrainSettings(**{**BASE, "steps": 4, "checkpoint_every": 2}, validation_every=2)
    train(tiny_klein(SPEC), album.items, longer, RunFolder.open(run.path), resume=True)
    assert [r["step"] for r in RunFolder.open(run.path).read_per_image()] == [2, 4]


def _record(step: int, left: dict[str, float]) -> dict:
    return {
        "step": step,
        "t": [0.2, 0.4, 0.6, 0.8],
        "items": [{"name": n, "loss": 2.0 * r, "base_loss": 2.0, "held_out": n == "e.png"} for n, r in left.items()],
    }


def test_per_image_list_names_the_least_and_most_learned_items(tmp_path: Path) -> None:
    """The latest record is read as loss now / base model's loss: the items nearest 1 are listed as least learned,
    the lowest as most learned (never the same item twice), in words, as plain data for the panel, as lint notes
    and as a thumbnail sheet of the album's files."""
    from klein_lora_lab.trainer_core.album.dataset_lint import LintReport
    from klein_lora_lab.trainer_core.analysis.per_image import (
        latest_learning,
        learning_lines,
        learning_sheet,
        learning_summary,
        with_learning,
    )
    from PIL import Image

    left = {"a.png": 0.9, "b.png": 0.5, "c.png": 0.6, "d.png": 0.2, "e.png": 0.55}
    learning = latest_learning([_record(2, {n: 1.0 for n in left}), _record(4, left)])
    assert learning.step == 4 and learning.median == pytest.approx(0.55)
    assert [i.name for i in learning.least(2)] == ["a.png", "c.png"]
    assert [i.name for i in learning.most(2)] == ["d.png", "b.png"]
    assert [i.name for i in latest_learning([_record(1, {"x": 1.0, "y": 0.5})]).most(3)] == ["y"]
    lines = "\n".join(learning_lines(learning, 2))
    assert "step 4" in lines and "a.png 0.90" in lines and "d.png 0.20" in lines
    assert "validation" in learning_lines(None)[0]
    summary = learning_summary(learning, 2)
    assert [r["name"] for r in summary["least"]] == ["a.png", "c.png"] and summary["most"][0]["left"] == 0.2
    assert learning_summary(None) is None
    report = with_learning(LintReport("album", 5, ()), learning, 2)
    assert report.files("least_learned") == ["a.png", "c.png"] and report.files("most_learned") == ["b.png", "d.png"]
    album = tmp_path / "album"
    album.mkdir()
    for k, name in enumerate(left):
        Image.new("RGB", (48, 32), (50 * k, 90, 160)).save(album / name)
    sheet = learning_sheet(learning, album, count=2)
    assert sheet.width > 2 * 160 and sheet.height > 2 * 160  # two rows of two thumbnails with labels
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "z.png")
    assert learning_sheet(learning, other).height < 100  # a note, not thumbnails of another album
