"""The lab's diagnosis clinic as measurements on tensors: memorisation, prompt flexibility, concept strength,
concept without trigger and scale sensitivity (the held-out split of the validation loss is in
training/data.py).

Every measure compares generations of a LoRA with generations of the base model (the same prompts, seed and
sampler at LoRA scale 0), so each one is a ratio to the base: 1 = "behaves like the base model", and the
album is the only reference there is (no extra model is downloaded to judge images).

Two feature spaces, both size-independent so generations and album images of different sizes compare:
  latent  FLUX.2 latents [128, h, w] average-pooled to LATENT_GRID × LATENT_GRID cells, flattened;
          distance = normalised L2: ‖a − b‖ / (‖a‖ + ‖b‖), in [0, 1] (0 = identical).
  pixel   images [H, W, 3] in 0..1 area-resized to PIXEL_SIZE × PIXEL_SIZE, flattened;
          distance = RMSE, in [0, 1].

Prompt groups (docs/diagnostics.md):
  trigger       album-like prompts with the trigger ("a photo of TOK"): how strongly the concept arrives;
  novel         prompts the album never showed ("a photo of TOK riding a bicycle", the bicycle test);
  trigger_free  prompts without the trigger: should stay where the base model puts them.

Nothing here imports ComfyUI; the diagnose node renders, this module measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LATENT_GRID = 8  # latent cells per side after pooling (8×8 cells = 128×128 px of layout at 1/16)
PIXEL_SIZE = 32  # pixels per side of the pixel-space thumbnails (colour and layout, not detail)

# Thresholds of the clinic (docs/diagnostics.md explains each; the sweet spot uses the same ones).
MEMORISED_BELOW = 0.5  # novel-prompt distance to the album at or below half the base's: the album comes back
COLLAPSED_BELOW = 0.5  # prompts differ less than half as much as on the base model: the painter stopped listening
TIMID_BELOW = 0.1  # album-like prompts moved less than 10 % of the way toward the album: the concept is not there
LEAK_ABOVE = 0.3  # trigger-free prompts moved 30 % of the way toward the album: the concept leaks without trigger

GROUPS = ("trigger", "novel", "trigger_free")


# ---------------------------------------------------------------------------------------------- features


def latent_features(latents: Tensor | Sequence[Tensor], grid: int = LATENT_GRID) -> Tensor:
    """Latents [N, C, h, w] (or a list of [C, h_i, w_i] of any sizes) -> [N, C·grid·grid] float32.

    Each latent is average-pooled to grid × grid cells (adaptive pooling also repeats cells of latents smaller
    than the grid), so album items of every bucket and generations of any size share one space.
    """
    items = list(latents) if not isinstance(latents, Tensor) else list(latents.unbind(0))
    if not items:
        raise ValueError("latent_features: no latents given (need at least one [C, h, w] latent).")
    pooled = [F.adaptive_avg_pool2d(x.detach().float().cpu()[None], grid)[0] for x in items]  # [C, g, g] each
    return torch.stack(pooled).flatten(1)


def pixel_features(images: Tensor | Sequence[Tensor], size: int = PIXEL_SIZE) -> Tensor:
    """Images [N, H, W, 3] in 0..1 (ComfyUI IMAGE, or a list of [H_i, W_i, 3]) -> [N, 3·size·size] float32.

    Area resizing to a small square keeps colour and layout (what "hands the album back" looks like) and drops
    the texture noise of a few sampling steps.
    """
    items = list(images) if not isinstance(images, Tensor) else list(images.unbind(0))
    if not items:
        raise ValueError("pixel_features: no images given (need at least one [H, W, 3] image).")
    small = []
    for img in items:
        chw = img.detach().float().cpu().clamp(0, 1).permute(2, 0, 1)[None]  # [1, 3, H, W]
        small.append(F.interpolate(chw, size=(size, size), mode="area")[0])
    return torch.stack(small).flatten(1)


# ---------------------------------------------------------------------------------------------- distances


def normalised_l2(a: Tensor, b: Tensor) -> Tensor:
    """[N, D] × [M, D] -> [N, M]: ‖a_i − b_j‖ / (‖a_i‖ + ‖b_j‖), in [0, 1]; 0 for identical vectors.

    Dividing by the norms makes the measure independent of the latent's overall scale, and the triangle
    inequality bounds it by 1 (opposite vectors)."""
    diff = torch.cdist(a.double(), b.double())
    norms = a.double().norm(dim=1)[:, None] + b.double().norm(dim=1)[None, :]
    return (diff / norms.clamp_min(1e-12)).float()


def rmse(a: Tensor, b: Tensor) -> Tensor:
    """[N, D] × [M, D] -> [N, M]: root mean squared difference (pixels in 0..1, so the result is in 0..1)."""
    return (torch.cdist(a.double(), b.double()) / math.sqrt(a.shape[1])).float()


SPACES = {"latent": normalised_l2, "pixel": rmse}


def nearest_distance(generated: Tensor, album: Tensor, space: str) -> Tensor:
    """[N, D] generations, [M, D] album -> [N]: each generation's distance to its nearest album image."""
    return SPACES[space](generated, album).min(dim=1).values


def mean_pairwise(features: Tensor, space: str) -> float:
    """Mean distance over all pairs i < j of [N, D] features (N ≥ 2): how much generations differ."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise needs at least 2 generations (different prompts), got {n}.")
    d = SPACES[space](features, features)
    i, j = torch.triu_indices(n, n, offset=1)
    return d[i, j].mean().item()


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of non-negative values (0 when any is 0): combines the ratios of the two spaces."""
    if any(v <= 0.0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def ratio(value: float, base: float) -> float:
    """value / base, with a base of 0 (identical base outputs) read as "no change": 1.0 when value is 0 too."""
    if base <= 1e-12:
        return 1.0 if value <= 1e-12 else math.inf
    return value / base


# ---------------------------------------------------------------------------------------------- the measures


@dataclass(frozen=True)
class Renders:
    """Features of one set of generations, one row per prompt in the plan's order: latent [P, D] and optionally
    pixel [P, D'] (None when no VAE decoded them)."""

    latent: Tensor
    pixel: Tensor | None = None

    def rows(self, index: Sequence[int]) -> Renders:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return Renders(self.latent[idx], None if self.pixel is None else self.pixel[idx])

    def spaces(self) -> dict[str, Tensor]:
        return {"latent": self.latent} | ({} if self.pixel is None else {"pixel": self.pixel})


def drift_toward_album(lora: Renders, base: Renders, album: Renders) -> dict[str, float]:
    """Nearest-album distance of the LoRA's generations relative to the base's, per space and combined.

    Returns {"latent": r, "pixel": r, "ratio": combined}: r = mean_g d_nn(lora_g) / mean_g d_nn(base_g).
    The combined ratio is the geometric mean of the spaces present. Below 1 the generations moved toward the
    album; near 0 they are album images.
    """
    out: dict[str, float] = {}
    for space, feats in lora.spaces().items():
        album_feats = album.spaces().get(space)
        base_feats = base.spaces().get(space)
        if album_feats is None or base_feats is None:
            continue
        lora_nn = nearest_distance(feats, album_feats, space).mean().item()
        base_nn = nearest_distance(base_feats, album_feats, space).mean().item()
        out[space] = ratio(lora_nn, base_nn)
    out["ratio"] = geometric_mean(list(out.values()))
    return out


def flexibility(lora: Renders, base: Renders) -> float:
    """Prompt flexibility: mean pairwise distance between generations of different prompts at one seed,
    LoRA / base (geometric mean over the spaces present). ≈ 1 listens like the base; ≤ COLLAPSED_BELOW:
    prompt changes stopped mattering."""
    ratios = [
        ratio(mean_pairwise(feats, space), mean_pairwise(base.spaces()[space], space))
        for space, feats in lora.spaces().items()
        if space in base.spaces()
    ]
    return geometric_mean(ratios)


def concept_strength(trigger_lora: Renders, trigger_base: Renders, album: Renders) -> float:
    """How far album-like trigger prompts moved toward the album: 1 − (LoRA / base nearest-album distance).

    0 = the trigger means nothing yet (timid); toward 1 = the generations look like the album. Negative values
    mean the LoRA pushed them away from the album (a caricature overshooting it)."""
    return 1.0 - drift_toward_album(trigger_lora, trigger_base, album)["ratio"]


def trigger_free_drift(free_lora: Renders, free_base: Renders, album: Renders) -> float:
    """Concept without trigger: 1 − (LoRA / base nearest-album distance) for prompts without the trigger.
    ≈ 0: the concept stays behind its trigger; ≥ LEAK_ABOVE: it leaks into every prompt."""
    return 1.0 - drift_toward_album(free_lora, free_base, album)["ratio"]


def change_from_base(lora: Renders, base: Renders) -> float:
    """Mean distance (latent space) between each prompt's LoRA generation and its base generation: how much
    the LoRA changes the picture at all (rises with scale; the clinic's "too strong" when it keeps rising
    while the concept does not)."""
    return normalised_l2(lora.latent, base.latent).diagonal().mean().item()


def measure(
    lora: Renders, base: Renders, album: Renders, groups: Mapping[str, Sequence[int]]
) -> dict[str, float | None]:
    """Every measure of one (checkpoint, scale): `groups` maps trigger/novel/trigger_free to the prompt rows.

    A group without prompts gives None for its measure; flexibility uses every prompt (needs ≥ 2 prompts).
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown prompt groups {unknown}: use {list(GROUPS)}.")

    def group(name: str) -> list[int]:
        return list(groups.get(name, ()))

    out: dict[str, float | None] = {"concept": None, "memorisation": None, "trigger_free_drift": None}
    if group("trigger"):
        out["concept"] = concept_strength(lora.rows(group("trigger")), base.rows(group("trigger")), album)
    if group("novel"):
        novel = drift_toward_album(lora.rows(group("novel")), base.rows(group("novel")), album)
        out["memorisation"] = novel["ratio"]
        out["memorisation_latent"] = novel.get("latent")
        out["memorisation_pixel"] = novel.get("pixel")
    if group("trigger_free"):
        out["trigger_free_drift"] = trigger_free_drift(
            lora.rows(group("trigger_free")), base.rows(group("trigger_free")), album
        )
    out["flexibility"] = flexibility(lora, base) if lora.latent.shape[0] >= 2 else None
    out["change"] = change_from_base(lora, base)
    return out


# ---------------------------------------------------------------------------------------------- scale curves


def crossing(xs: Sequence[float], ys: Sequence[float | None], threshold: float, below: bool = True) -> float | None:
    """The first x (linear interpolation between samples, xs ascending) where ys goes below `threshold`
    (or above it with below=False); None when it never does. Samples with y None are skipped.

    Scale sensitivity: e.g. the scale at which flexibility drops below COLLAPSED_BELOW."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y is not None]
    pts.sort()

    def past(y: float) -> bool:
        return y < threshold if below else y > threshold

    for k, (x, y) in enumerate(pts):
        if past(y):
            if k == 0:
                return x
            x0, y0 = pts[k - 1]
            return x0 + (threshold - y0) / (y - y0) * (x - x0) if y != y0 else x
    return None


def clinic(record: Mapping[str, float | None]) -> list[str]:
    """The clinic's findings for one record (its measures): any of 'underfit/timid', 'overfit/memorised',
    'too strong/caricature' (prompts stopped mattering without the album coming back), 'leaks without
    trigger'; an empty list reads as healthy."""
    found = []
    concept, memo, flex, leak = (
        record.get(k) for k in ("concept", "memorisation", "flexibility", "trigger_free_drift")
    )
    if memo is not None and memo <= MEMORISED_BELOW:
        found.append("overfit/memorised")
    elif flex is not None and flex <= COLLAPSED_BELOW:
        found.append("too strong/caricature")
    if concept is not None and concept < TIMID_BELOW and not found:
        found.append("underfit/timid")
    if leak is not None and leak >= LEAK_ABOVE:
        found.append("leaks without trigger")
    return found
