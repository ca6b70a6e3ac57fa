"""One diagnosis pass of a run: render the base model and every checkpoint × scale on three prompt groups,
measure each against the base and the album (diagnostics.py), record the pass in `<run>/diagnostics.json`
and suggest the sweet spot (sweet_spot.py).

Rendering is the caller's: `sample(combos)` turns (checkpoint step, or None for the base model; scale) pairs
into latents, every prompt of the plan per pair, and `decode(latents)` turns latents into images. The diagnose
node passes ComfyUI's sampler and VAE; tests can pass anything with the same shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..album.dataset import insert_trigger
from ..runs.runfolder import RunFolder, checkpoint_step
from .diagnostics import GROUPS, Renders, clinic, latent_features, measure, pixel_features
from .scrub import parse_prompts, parse_scales, select_checkpoints
from .sweet_spot import SweetSpot, read_diagnostics, suggest, write_diagnostics

LOG = logging.getLogger("klein_lora_lab")

# (checkpoint step or None = base model, scale) per combo -> latents [len(combos)·P, 128, h, w], prompt-minor
Sampler = Callable[[Sequence[tuple[int | None, float]]], Tensor]
Decoder = Callable[[Tensor], Tensor]  # latents [n, 128, h, w] -> images [n, H, W, 3] in 0..1


@dataclass(frozen=True)
class DiagnosisPlan:
    """What one pass renders: checkpoints (ascending steps) × scales × prompts, the prompts grouped."""

    steps: list[int]
    scales: list[float]
    prompts: list[str]
    groups: dict[str, list[int]]  # trigger / novel / trigger_free -> rows of `prompts`

    def prompt_config(self) -> dict[str, list[str]]:
        return {g: [self.prompts[i] for i in self.groups[g]] for g in GROUPS}


@dataclass(frozen=True)
class Diagnosis:
    records: list[dict[str, Any]]  # one per checkpoint × scale: measures and findings
    images: Tensor  # every frame: base prompts first, then checkpoint × scale × prompt
    timing: str


def prompt_groups(texts: Mapping[str, str], trigger: str) -> tuple[list[str], dict[str, list[int]]]:
    """(every prompt in group order, group -> row indices); '[trigger]' becomes the run's trigger word."""
    prompts: list[str] = []
    groups: dict[str, list[int]] = {}
    for group in GROUPS:
        lines = [insert_trigger(p, trigger, "none") for p in parse_prompts(texts[group])]
        groups[group] = list(range(len(prompts), len(prompts) + len(lines)))
        prompts.extend(lines)
    if len(prompts) < 2:
        raise ValueError("give at least two prompts in all (flexibility compares generations of different prompts).")
    return prompts, groups


def diagnosis_plan(
    texts: Mapping[str, str], trigger: str, selection: str, steps: Sequence[int], scales: str
) -> DiagnosisPlan:
    """The plan from the node's widgets: prompt lines per group, a checkpoint selection ('all', 'last 5', ...)
    among the run's `steps`, and LoRA scales above 0 (the base, scale 0, is always rendered)."""
    prompts, groups = prompt_groups(texts, trigger)
    chosen = select_checkpoints(selection, sorted(steps))
    scale_values = [s for s in parse_scales(scales, 0.0, 4.0) if s > 0]
    if not scale_values:
        raise ValueError(f"scales '{scales}' has no scale above 0: give e.g. '0.5,1,2,4'.")
    return DiagnosisPlan(chosen, scale_values, prompts, groups)


def album_renders(latents: Sequence[Tensor], decode: Decoder) -> Renders:
    """Features of the album: its latents as encoded for training, and their decodes (the same decoder as the
    generations, so pixel distances compare like with like), decoded one latent size at a time."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, latent in enumerate(latents):
        by_size.setdefault(tuple(latent.shape), []).append(i)
    images: list[Tensor | None] = [None] * len(latents)
    for rows in by_size.values():
        decoded = decode(torch.stack([latents[i] for i in rows]))
        for i, image in zip(rows, decoded, strict=True):
            images[i] = image
    return Renders(latent_features(list(latents)), pixel_features(images))


def diagnose(
    plan: DiagnosisPlan,
    sample: Sampler,
    decode: Decoder,
    album_latents: Sequence[Tensor],
    lora_names: Mapping[int, str],
) -> Diagnosis:
    """Render base + every checkpoint × scale × prompt and measure them; `lora_names` labels the records."""
    n = len(plan.prompts)
    combos = [(None, 0.0)] + [(s, c) for s in plan.steps for c in plan.scales]
    start = time.perf_counter()
    samples = sample(combos)
    sampled = time.perf_counter()
    images = decode(samples)
    album = album_renders(album_latents, decode)
    decoded = time.perf_counter()
    feats = Renders(latent_features(samples), pixel_features(images))
    base = feats.rows(range(n))
    records = []
    for k, (step, scale) in enumerate(combos[1:]):
        measures = measure(feats.rows(range(n * (k + 1), n * (k + 2))), base, album, plan.groups)
        records.append(
            {"step": step, "scale": scale, "lora": lora_names[step], **measures, "findings": clinic(measures)}
        )
    seconds = time.perf_counter() - start
    checkpoints = len(plan.steps)
    timing = (
        f"{n * len(combos)} frames ({checkpoints} checkpoints × {len(plan.scales)} scales × {n} prompts + {n} base) "
        f"in {seconds:.1f} s ({sampled - start:.1f} s sampling, {decoded - sampled:.1f} s decoding generations and "
        f"album), {seconds / max(1, checkpoints):.2f} s per checkpoint"
    )
    LOG.info("Klein LoRA Lab: diagnose: %s", timing)
    return Diagnosis(records, images, timing)


def report_lines(records: Sequence[Mapping[str, Any]], album_note: str, timing: str) -> list[str]:
    lines = [album_note, timing] if album_note else [timing]
    for r in records:
        found = ", ".join(r["findings"]) or "healthy"
        lines.append(
            f"step {r['step']} · scale {r['scale']:g}: concept {_n(r['concept'])}, flexibility "
            f"{_n(r['flexibility'])}, bicycle {_n(r['memorisation'])}, trigger-free drift "
            f"{_n(r['trigger_free_drift'])} -> {found}"
        )
    return lines


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def record_diagnosis(
    run: RunFolder, plan: DiagnosisPlan, result: Diagnosis, render: Mapping[str, Any], album_hash: str
) -> tuple[str, SweetSpot]:
    """Write the pass into `<run>/diagnostics.json` (render = the sampler settings), suggest the sweet spot from
    every pass of the same config and the validation loss; returns (report text, suggestion)."""
    config = {"prompts": plan.prompt_config(), "render": dict(render), "album_hash": album_hash}
    write_diagnostics(run.path, config, result.records)
    steps = sorted(checkpoint_step(p) for p in run.checkpoints())
    spot = suggest(read_diagnostics(run.path)["records"], run.read_metrics(), steps)
    note = ""
    if run.meta.get("album_hash") not in (None, album_hash):
        note = (
            f"note: the encoded dataset (album {album_hash}) is not the album this run "
            f"trained on ({run.meta['album_hash']}): connect the same dataset for meaningful distances."
        )
    return "\n".join([*report_lines(result.records, note, result.timing), "", spot.text()]), spot
