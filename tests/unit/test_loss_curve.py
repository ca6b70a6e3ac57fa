"""The loss-curve picture: size and layout of the IMAGE tensor, what it draws, EMA and metrics parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from klein_lora_lab.trainer_core.analysis.loss_curve import (
    CHECKPOINT,
    SMOOTH,
    VALIDATION,
    LossHistory,
    ema,
    history_from_records,
    loss_curve_image,
    render_loss_curve,
)


def _has_colour(img, colour, tol=8) -> bool:
    t = torch.from_numpy(np.asarray(img, dtype=np.int32).reshape(-1, 3))
    return bool(((t - torch.tensor(colour)).abs().max(dim=1).values <= tol).any())


def test_ema_is_bias_corrected_and_tracks_constants():
    """EMA of a constant series is that constant from the first value on; it lags a step change."""
    assert ema([2.0] * 5) == pytest.approx([2.0] * 5)
    out = ema([0.0] * 5 + [1.0] * 5, 0.5)
    assert out[4] == 0.0 and 0.0 < out[5] < out[9] < 1.0
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_image_tensor_layout():
    """The node output is [1, H, W, 3] float in 0..1 with the requested size."""
    hist = LossHistory(list(range(1, 51)), [1.0 / math.sqrt(s) for s in range(1, 51)])
    image = loss_curve_image(hist, width=400, height=200)
    assert image.shape == (1, 200, 400, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_curve_draws_each_series_only_when_present():
    """Smoothed loss always shows; validation and checkpoint colours appear only when those series exist."""
    steps = list(range(1, 101))
    losses = [0.5 + 0.3 * math.sin(s) * math.exp(-s / 50) for s in steps]
    bare = render_loss_curve(LossHistory(steps, losses))
    assert _has_colour(bare, SMOOTH) and not _has_colour(bare, VALIDATION) and not _has_colour(bare, CHECKPOINT)
    full = render_loss_curve(LossHistory(steps, losses, [25, 50, 75, 100], [0.6, 0.55, 0.5, 0.52], [50, 100]))
    assert _has_colour(full, VALIDATION) and _has_colour(full, CHECKPOINT)


def test_empty_history_still_renders():
    """A run with no metrics yet gives a valid (placeholder) picture instead of an error."""
    img = render_loss_curve(LossHistory(), 300, 150)
    assert img.size == (300, 150)


def test_history_from_records_merges_and_dedups():
    """Records give train loss, validation loss and checkpoint steps; a repeated step keeps its last value."""
    records = [
        {"step": 1, "loss": 0.9, "lr": 1e-4},
        {"step": 2, "loss": 0.8},
        {"step": 2, "loss": 0.7},
        {"step": 2, "val_loss": 0.75},
        {"step": 3, "loss": float("nan")},
        {"step": 4, "loss": 0.6, "checkpoint": "checkpoints/step_000004.safetensors"},
        {"event": "start"},
    ]
    hist = history_from_records(records, checkpoints=[2])
    assert hist.steps == [1, 2, 4] and hist.losses == [0.9, 0.7, 0.6]
    assert hist.val_steps == [2] and hist.val_losses == [0.75]
    assert hist.checkpoints == [2, 4]
