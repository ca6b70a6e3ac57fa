"""Rendering a frame exactly as a stock graph would (EmptyFlux2LatentImage -> KSampler -> VAE Decode), for the nodes
that render many frames in one execution (checkpoint scrub, mixer grid, diagnostics).

`render_latent` is one KSampler call: the same noise for the same seed (`comfy.sample.prepare_noise`), the same
`comfy.sample.sample`, so a frame equals what KSampler gives with the same widgets. It shows no per-step previews
(a grid of hundreds of frames would flood the frontend) and checks for Cancel at every step.

UI contract with the scrubber widget (js/): a grid node returns `ui={SCRUB_UI_KEY: [meta]}` — never "images",
whose default preview would show every frame. Frames and thumbnails are PNG/JPEG files under the output folder,
`output/klein_lora_lab/scrub/<run-or-grid-name>/<8-hex of the inputs>/frame_0000.png` and `thumb_0000.jpg`
(longest side <= THUMB_SIZE), so they survive a server restart. meta:

    {"version": 1, "node": "KleinLabScrubRun",
     "axes": [{"name": "step", "values": [300, 600, 900]}, {"name": "scale", "values": [0, 1, 2]},
              {"name": "prompt", "values": ["a TOK cat"]}],
     "frames": [{"index": 0, "coords": [0, 0, 0], "label": "step 300 · scale 0",
                 "image": {"filename": "frame_0000.png", "subfolder": "klein_lora_lab/scrub/x/ab12cd34",
                           "type": "output"},
                 "thumb": {"filename": "thumb_0000.jpg", "subfolder": "...", "type": "output"}}],
     "grid": {"filename": "grid.png", "subfolder": "...", "type": "output"}}

`coords[i]` indexes `axes[i].values`; the mixer grid's axes are `scale_a`, `scale_b`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sample
import torch
from torch import Tensor

SCRUB_UI_KEY = "klein_scrub"
SCRUB_UI_VERSION = 1
SCRUB_SUBFOLDER = "klein_lora_lab/scrub"  # under ComfyUI's output folder
THUMB_SIZE = 192  # longest side of a thumbnail, px
LATENT_CHANNELS = 128  # Flux2 latent: 128 channels at 1/16 of the image size


@dataclass(frozen=True)
class RenderSettings:
    """The KSampler widgets of one frame (plus the EmptyFlux2LatentImage size)."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int


def empty_latent(settings: RenderSettings, batch: int = 1) -> dict:
    """{"samples": zeros [b, 128, h/16, w/16]}, exactly as EmptyFlux2LatentImage makes it."""
    samples = torch.zeros(
        [batch, LATENT_CHANNELS, settings.height // 16, settings.width // 16], device=mm.intermediate_device()
    )
    return {"samples": samples}


def _interrupt_check(_step: int, _x0: Tensor, _x: Tensor, _total: int) -> None:
    """Sampler callback: raises ComfyUI's interruption when Cancel was pressed (no preview image is made)."""
    mm.throw_exception_if_processing_interrupted()


def render_latent(model, positive, negative, settings: RenderSettings, latent: dict | None = None) -> Tensor:
    """One KSampler-equivalent call on `model` (a ModelPatcher); returns latent samples [b, 128, h/16, w/16].

    The noise comes from `settings.seed` exactly as KSampler makes it, so the same seed gives the same noise for
    every frame: only the model's adapters change between frames.
    """
    latent = empty_latent(settings) if latent is None else latent
    latent_image = comfy.sample.fix_empty_latent_channels(
        model, latent["samples"], latent.get("downscale_ratio_spacial", None)
    )
    noise = comfy.sample.prepare_noise(latent_image, settings.seed, latent.get("batch_index"))
    return comfy.sample.sample(
        model,
        noise,
        settings.steps,
        settings.cfg,
        settings.sampler_name,
        settings.scheduler,
        positive,
        negative,
        latent_image,
        noise_mask=latent.get("noise_mask"),
        callback=_interrupt_check,
        disable_pbar=True,
        seed=settings.seed,
    )


def decode(vae, samples: Tensor) -> Tensor:
    """Latent samples [b, 128, h, w] -> IMAGE [b, 16h, 16w, 3] in 0..1, as VAE Decode does."""
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs return [b, t, H, W, 3]: one batch, as VAE Decode combines them
        images = images.reshape(-1, *images.shape[-3:])
    return images


def encode_prompts(clip, prompts: Sequence[str]) -> list:
    """One CONDITIONING per prompt, exactly as CLIPTextEncode encodes it."""
    if clip is None:
        raise ValueError("no CLIP connected: connect a CLIP loader to encode the prompts.")
    return [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in prompts]
