"""Small drawing helpers shared by the charts (loss curve, sweet spot, scrub grids): the font, round axis
ticks, tick labels, and the conversion of a finished picture to a ComfyUI IMAGE tensor."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFont
from torch import Tensor

BACKGROUND = (20, 20, 22)
GRID = (55, 55, 60)
AXIS_TEXT = (190, 190, 195)


def chart_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at `size` px (the bitmap font on Pillow < 10.1, which has no sizes)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-12 * abs(hi) and len(ticks) < 50:
        ticks.append(v)
        v += step
    return ticks


def tick_label(v: float) -> str:
    """A short axis label: 3 significant digits, scientific notation for very large or small values."""
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def to_image_tensor(img: Image.Image) -> Tensor:
    """PIL image → ComfyUI IMAGE: [1, H, W, 3] float32 in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
