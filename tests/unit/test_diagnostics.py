"""The clinic's measures on constructed generators: a generator that hands the album back for every prompt
scores as memorised, one that follows the prompt does not; collapse and trigger-free drift are detected; the
held-out validation split is fixed, seeded and leaves small albums alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from klein_lora_lab.trainer_core.analysis.diagnostics import (
    COLLAPSED_BELOW,
    LEAK_ABOVE,
    MEMORISED_BELOW,
    TIMID_BELOW,
    Renders,
    clinic,
    crossing,
    latent_features,
    measure,
    normalised_l2,
    pixel_features,
)
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training import trainer as trainer_module
from klein_lora_lab.trainer_core.training.data import HOLDOUT_MIN_ITEMS, TrainItem, holdout_split
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import train

GROUPS = {"trigger": [0, 1], "novel": [2, 3], "trigger_free": [4, 5]}
PROMPTS = 6
ALBUM = 5


def _latent(seed: int) -> torch.Tensor:
    return torch.randn(128, 4, 4, generator=torch.Generator().manual_seed(seed))


def _decode(latent: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for the VAE: [128, 4, 4] -> [16, 16, 3] in 0..1 (pixels follow the latent)."""
    rgb = torch.sigmoid(latent[:3]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    return rgb.permute(1, 2, 0)


ALBUM_LATENTS = [_latent(1000 + i) for i in range(ALBUM)]


def _renders(generator: Callable[[int], torch.Tensor]) -> Renders:
    latents = [generator(p) for p in range(PROMPTS)]
    return Renders(latent_features(latents), pixel_features([_decode(x) for x in latents]))


def base(p: int) -> torch.Tensor:
    """The base model: every prompt its own picture, unrelated to the album."""
    return _latent(p)


def memorising(p: int) -> torch.Tensor:
    """Whatever the prompt, an album image comes back (with a little sampling noise)."""
    return ALBUM_LATENTS[p % 2] + 0.02 * _latent(500 + p)


def following(p: int) -> torch.Tensor:
    """The concept arrives in trigger prompts (40 % of the way toward an album image), the prompt still
    decides the picture, and prompts without the trigger stay with the base model."""
    if p in GROUPS["trigger_free"]:
        return base(p)
    return 0.6 * base(p) + 0.4 * ALBUM_LATENTS[p % ALBUM]


def collapsed(p: int) -> torch.Tensor:
    """One picture for every prompt, and not an album image: the painter stopped listening."""
    return _latent(777)


def leaking(p: int) -> torch.Tensor:
    """Follows the prompt with the trigger, but prompts without the trigger turn into album images too."""
    if p in GROUPS["trigger_free"]:
        return ALBUM_LATENTS[p % ALBUM]
    return following(p)


@pytest.fixture(scope="module")
def album() -> Renders:
    return Renders(latent_features(ALBUM_LATENTS), pixel_features([_decode(x) for x in ALBUM_LATENTS]))


@pytest.fixture(scope="module")
def base_renders() -> Renders:
    return _renders(base)


def test_base_against_itself_is_neutral(album, base_renders):
    """The base model measured against itself: ratios 1, concept and drift 0, no finding."""
    m = measure(base_renders, base_renders, album, GROUPS)
    assert m["memorisation"] == pytest.approx(1.0) and m["flexibility"] == pytest.approx(1.0)
    assert m["concept"] == pytest.approx(0.0, abs=1e-6) and m["trigger_free_drift"] == pytest.approx(0.0, abs=1e-6)
    assert m["change"] == pytest.approx(0.0, abs=1e-6)
    assert clinic(m) == ["underfit/timid"]  # scale 0 has no concept: exactly what timid means


def test_album_handed_back_scores_as_memorised(album, base_renders):
    """The bicycle test: a generator returning album images for novel prompts drops the memorisation ratio
    far below 1 in both spaces, and the clinic says overfit/memorised."""
    m = measure(_renders(memorising), base_renders, album, GROUPS)
    assert m["memorisation"] < 0.1 and m["memorisation_latent"] < 0.1 and m["memorisation_pixel"] < 0.1
    assert m["memorisation"] <= MEMORISED_BELOW
    assert "overfit/memorised" in clinic(m)


def test_prompt_following_generator_is_healthy(album, base_renders):
    """A LoRA that brings the concept but still follows the prompt: not memorised, flexible, a real concept
    strength, no trigger-free drift — the clinic finds nothing."""
    m = measure(_renders(following), base_renders, album, GROUPS)
    assert MEMORISED_BELOW < m["memorisation"] < 1.0
    assert m["flexibility"] > COLLAPSED_BELOW
    assert m["concept"] > TIMID_BELOW
    assert abs(m["trigger_free_drift"]) < 1e-6
    assert clinic(m) == []


def test_collapse_detected(album, base_renders):
    """One picture for every prompt: flexibility ≈ 0; not the album, so the finding is too strong/caricature."""
    m = measure(_renders(collapsed), base_renders, album, GROUPS)
    assert m["flexibility"] < 0.01
    assert m["memorisation"] > MEMORISED_BELOW
    assert clinic(m)[0] == "too strong/caricature"


def test_trigger_free_drift_detected(album, base_renders):
    """Prompts without the trigger that turn into album images show drift near 1 and the leak finding; the
    same LoRA's trigger prompts are unchanged from the healthy one."""
    leak = measure(_renders(leaking), base_renders, album, GROUPS)
    healthy = measure(_renders(following), base_renders, album, GROUPS)
    assert leak["trigger_free_drift"] > 0.9 >= LEAK_ABOVE
    assert "leaks without trigger" in clinic(leak)
    assert leak["concept"] == pytest.approx(healthy["concept"])


def test_latent_only_measures_without_pixels(album, base_renders):
    """Without a VAE (no pixel features) the measures come from the latent space alone."""
    lora = Renders(_renders(memorising).latent)
    m = measure(lora, Renders(base_renders.latent), album, GROUPS)
    assert m["memorisation"] == pytest.approx(m["memorisation_latent"]) and m["memorisation_pixel"] is None


def test_features_accept_mixed_sizes():
    """Album latents of different buckets and images of different sizes map into one feature space."""
    feats = latent_features([torch.ones(128, 2, 2), torch.ones(128, 6, 10)])
    assert feats.shape == (2, 128 * 64) and torch.allclose(feats[0], feats[1])
    pix = pixel_features([torch.full((20, 40, 3), 0.5), torch.full((64, 64, 3), 0.5)])
    assert pix.shape == (2, 3 * 32 * 32) and torch.allclose(pix[0], pix[1])
    d = normalised_l2(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert d.tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="at least one"):
        latent_features([])


def test_scale_crossing():
    """Scale sensitivity: the interpolated scale where a curve first crosses a threshold, None if never."""
    scales = [0.5, 1.0, 2.0, 4.0]
    assert crossing(scales, [1.0, 0.9, 0.3, 0.1], 0.5) == pytest.approx(1.0 + (0.5 - 0.9) / (0.3 - 0.9))
    assert crossing(scales, [1.0, 0.9, 0.8, 0.7], 0.5) is None
    assert crossing(scales, [0.2, None, 0.6, 0.9], 0.5, below=False) == pytest.approx(0.5 + 0.3 / 0.4 * 1.5)


def test_holdout_split_fixed_seeded_and_small_albums_untouched():
    """≥ HOLDOUT_MIN_ITEMS items: a fixed share held out, disjoint from training, same for the same seed and
    different for another; smaller albums (or share 0) hold nothing out."""
    train, held = holdout_split(40, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == list(range(40)) and not set(train) & set(held)
    assert holdout_split(40, 0.1, seed=3) == (train, held)
    assert holdout_split(40, 0.1, seed=4)[1] != held
    assert holdout_split(HOLDOUT_MIN_ITEMS - 1, 0.5, seed=3) == (list(range(HOLDOUT_MIN_ITEMS - 1)), [])
    assert holdout_split(HOLDOUT_MIN_ITEMS, 0.01, seed=0)[1].__len__() == 1
    assert holdout_split(40, 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(40, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------- held-out training

TRAIN_SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)


def _album(n: int) -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"img{i:02d}")
        for i in range(n)
    ]


def _train_recording(tmp_path, items: list[TrainItem], holdout: float, monkeypatch) -> tuple[RunFolder, set, set]:
    """Train 4 steps with validation every 2; returns the run and the item names seen by training batches and
    by validation batches (validation stacks one item len(VALIDATION_T) times). The per-image pass, which reads
    every album item without gradients at each validation, is recorded apart (it is neither)."""
    seen_train, seen_val, seen_per_image = set(), set(), set()
    real = trainer_module.collate
    real_album_losses = trainer_module._Run._album_losses
    in_per_image = [False]

    def recording(items_, indices, *args, **kwargs):
        batch = real(items_, indices, *args, **kwargs)
        is_val = len(indices) == len(trainer_module.VALIDATION_T) and len(set(indices)) == 1 and not args[1:]
        assert not (in_per_image[0] and torch.is_grad_enabled())  # the per-image pass never trains
        (seen_per_image if in_per_image[0] else seen_val if is_val else seen_train).update(batch.names)
        return batch

    def album_losses(self, base: bool) -> list[float]:
        in_per_image[0] = True
        try:
            return real_album_losses(self, base)
        finally:
            in_per_image[0] = False

    monkeypatch.setattr(trainer_module, "collate", recording)
    monkeypatch.setattr(trainer_module._Run, "_album_losses", album_losses)
    settings = TrainSettings(
        rank=4,
        alpha=4,
        learning_rate=1e-3,
        steps=4,
        checkpoint_every=4,
        validation_every=2,
        gradient_checkpointing=False,
        batch_size=2,
        save_dtype="fp32",
        validation_holdout=holdout,
        seed=9,
    )
    run = RunFolder.create(tmp_path / f"run_{len(items)}_{holdout}", settings, {"trigger": "TOK"})
    train(tiny_klein(TRAIN_SPEC), items, settings, run)
    assert seen_per_image == {item.name for item in items}
    return run, seen_train, seen_val


def test_trainer_never_trains_on_held_out_items(tmp_path, monkeypatch):
    """With 12 items and a 0.25 holdout, the items holdout_split names are recorded in run.json, never appear in
    a training batch, and are exactly the items the validation loss is measured on."""
    items = _album(12)
    run, seen_train, seen_val = _train_recording(tmp_path, items, 0.25, monkeypatch)
    held = [items[i].name for i in holdout_split(12, 0.25, 9)[1]]
    assert len(held) == 3 and RunFolder.open(run.path).meta["held_out"] == held
    assert seen_val == set(held) and not seen_train & set(held)
    assert [r["step"] for r in run.read_metrics() if "val_loss" in r] == [2, 4]


def test_small_album_trains_as_before(tmp_path, monkeypatch):
    """Below HOLDOUT_MIN_ITEMS items a holdout share changes nothing: the same losses as holdout 0, validation on
    training items, no held_out entry in run.json."""
    items = _album(HOLDOUT_MIN_ITEMS - 1)
    run_a, train_a, val_a = _train_recording(tmp_path, items, 0.0, monkeypatch)
    run_b, train_b, val_b = _train_recording(tmp_path, items, 0.3, monkeypatch)
    assert [r["loss"] for r in run_a.read_metrics()] == [r["loss"] for r in run_b.read_metrics()]
    assert [r.get("val_loss") for r in run_a.read_metrics()] == [r.get("val_loss") for r in run_b.read_metrics()]
    assert val_a == val_b and len(val_b) == trainer_module.VALIDATION_ITEMS  # training items, spread as before
    assert train_a == train_b and "held_out" not in RunFolder.open(run_b.path).meta
