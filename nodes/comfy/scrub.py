"""The render-grid pipeline of the scrub and mixer-grid nodes, and the diagnose node's sampler.

A grid is a list of LoRA stacks × a list of prompts: each stack is applied at forward time on a clone of the
SAME input MODEL (`apply_items`: no reload, no re-patching), every prompt is sampled with the same seed and
settings, the frames are decoded afterwards in chunks (the diffusion model and the VAE each load once), and
frames, thumbnails and the labelled grid are written under `output/klein_lora_lab/scrub/<name>/<8-hex key>/`
for the scrubber (render.py describes the UI contract).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from comfy_api.latest import io
from torch import Tensor

from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.scrub import ScrubError, compose_grid, inputs_key, parse_prompts
from .forward_loras import StackItem, apply_items
from .identities import model_identity
from .images import tensor_to_pil
from .render import (
    SCRUB_UI_KEY,
    RenderSettings,
    decode_frames,
    encode_prompts,
    render_frames,
    scrub_folder,
    write_scrub_output,
)

LOG = logging.getLogger("klein_lora_lab")
POSITIVE_PROMPT = "(positive input)"  # the prompt text shown when a positive conditioning replaces clip + prompts


def resolve_negative(negative, clip, positive_like, cfg: float):
    """The negative: the connected one; else the empty prompt through CLIP; else (cfg 1 only) a zeroed copy of
    the positive, which ComfyUI never evaluates at cfg 1."""
    if negative is not None:
        return negative
    if clip is not None:
        return encode_prompts(clip, [""])[0]
    if cfg != 1.0:
        raise ScrubError(
            f"cfg={cfg:g} needs a negative: connect a negative conditioning or a CLIP (the empty prompt is used), "
            "or set cfg to 1."
        )
    return [[c.clone().zero_(), dict(extra)] for c, extra in positive_like]


def positives_of(clip, prompts: str, positive, one_prompt: bool = False) -> tuple[list[str], list]:
    """(prompt texts, CONDITIONING per prompt): the positive input when connected, else clip + the prompt lines
    (one_prompt: the whole text is one prompt, as CLIP Text Encode reads it)."""
    if positive is not None:
        return [POSITIVE_PROMPT], [positive]
    if clip is None:
        what = "the prompt" if one_prompt else "prompts"
        raise ScrubError(f"connect a clip (with {what}) or a positive conditioning.")
    texts = [prompts] if one_prompt else parse_prompts(prompts)
    if not texts:
        raise ScrubError("prompts is empty: type one prompt per line.")
    return texts, encode_prompts(clip, texts)


@dataclass(frozen=True)
class GridPrompts:
    """The prompt side of a grid: prompt texts, a CONDITIONING per prompt, and the negative."""

    texts: list[str]
    positives: list[Any]
    negative: Any


def grid_prompts(clip, prompts: str, positive, negative, cfg: float, one_prompt: bool = False) -> GridPrompts:
    """The prompts of a grid node's inputs (positives_of) with their negative (resolve_negative)."""
    texts, positives = positives_of(clip, prompts, positive, one_prompt)
    return GridPrompts(texts, positives, resolve_negative(negative, clip, positives[0], cfg))


@dataclass(frozen=True)
class GridRender:
    """Everything one grid node renders and writes; frames are stack-major, then prompt."""

    node: str  # node id, for the scrubber's UI metadata
    name: str  # folder under output/klein_lora_lab/scrub (a safe name)
    log_name: str  # what the timing line in the log calls this grid ("scrub <run>", "mixer grid A × B")
    stacks: Sequence[Sequence[StackItem]]  # the LoRAs of each (row, column) cell group
    prompts: GridPrompts  # every prompt is rendered for every stack
    settings: RenderSettings
    axes: list[dict]  # the UI metadata's axes (render.py)
    frames: Sequence[Any]  # the plan's frames (.coords into the axes, .label), in render order
    records: list[dict]  # the labels output, one record per frame
    title: str
    row_headers: list[str]
    col_headers: list[str]
    key: Mapping[str, Any]  # inputs identifying the frames besides the model, the VAE and the settings


def render_grid(model, vae, grid: GridRender) -> io.NodeOutput:
    """Render, decode, label and write every frame of `grid`; the node's outputs (frames, grid IMAGE, labels
    JSON) with the scrubber's UI metadata."""

    def jobs():
        for items in grid.stacks:
            patched, _report = apply_items(model, list(items))  # a clone of the SAME input model per stack
            for positive in grid.prompts.positives:
                yield patched, positive

    total = len(grid.stacks) * len(grid.prompts.positives)
    samples, times = render_frames(jobs(), grid.prompts.negative, grid.settings, total)
    images = decode_frames(vae, samples, times)
    LOG.info("Klein LoRA Lab: %s: %s", grid.log_name, times.line())
    pil = tensor_to_pil(images)
    cells = [(f.coords, f.label) for f in grid.frames]
    labels = [label for _coords, label in cells]
    picture = compose_grid(pil, len(grid.col_headers), labels, grid.row_headers, grid.col_headers, grid.title)
    key = inputs_key({"model": model_identity(model, vae), "settings": asdict(grid.settings), **grid.key})
    meta = write_scrub_output(grid.node, scrub_folder(grid.name, key), grid.axes, cells, pil, picture)
    text = json.dumps(grid.records, ensure_ascii=False)
    return io.NodeOutput(images, to_image_tensor(picture), text, ui={SCRUB_UI_KEY: [meta]})


def checkpoint_sampler(
    model, positives: Sequence[Any], negative, settings: RenderSettings, lora_names: Mapping[int, str]
) -> Callable[[Sequence[tuple[int | None, float]]], Tensor]:
    """sample(combos) for trainer_core.analysis.diagnose: per (checkpoint step, or None for the base model;
    scale) every prompt, in one progress bar -> latents [len(combos)·P, 128, h/16, w/16]."""

    def sample(combos: Sequence[tuple[int | None, float]]) -> Tensor:
        def jobs():
            for step, scale in combos:
                patched = model if step is None else apply_items(model, [StackItem(lora_names[step], scale)])[0]
                for positive in positives:  # jobs run lazily: one clone at a time
                    yield patched, positive

        return render_frames(jobs(), negative, settings, len(combos) * len(positives))[0]

    return sample
