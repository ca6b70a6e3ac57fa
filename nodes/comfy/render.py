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

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths
import torch
from PIL import Image
from torch import Tensor

from ...trainer_core.analysis.scrub import SEP, thumbnail
from ...trainer_core.errors import check_number
from ...trainer_core.files.atomic import atomic_write_with
from ...trainer_core.files.safe_paths import child_path
from ...trainer_core.model.klein import LATENT_CHANNELS
from ...trainer_core.model.variants import DISTILLED_CFG, DISTILLED_STEPS, SAMPLING_CHOICES, SAMPLING_DISTILLED
from ...trainer_core.training.sampling import CFG_MAX, CFG_MIN
from .images import decode_images

SCRUB_UI_KEY = "klein_scrub"
SCRUB_UI_VERSION = 1
SCRUB_SUBFOLDER = "klein_lora_lab/scrub"  # under ComfyUI's output folder
THUMB_SIZE = 192  # longest side of a thumbnail, px
DECODE_CHUNK = 8  # frames decoded per VAE call (bounds the decoder's activation memory)


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

    def __post_init__(self) -> None:  # NaN passes ComfyUI's min/max check: it would render black frames
        check_number(self.cfg, "cfg", CFG_MIN, CFG_MAX)

    @classmethod
    def from_widgets(cls, widgets: Mapping[str, Any]) -> RenderSettings:
        """The settings from a node's KSampler-like widgets (widgets.render_inputs), ignoring the others; with
        `sampling` "distilled: 4 steps, cfg 1" (widgets.sampling_input) the distilled Klein's steps and cfg
        replace the steps and cfg widgets."""
        values = {f.name: widgets[f.name] for f in fields(cls)}
        sampling = widgets.get("sampling") or SAMPLING_CHOICES[0]
        if sampling not in SAMPLING_CHOICES:
            raise ValueError(f"sampling={sampling!r} is not one of {list(SAMPLING_CHOICES)}.")
        if sampling == SAMPLING_DISTILLED:
            values.update(steps=DISTILLED_STEPS, cfg=DISTILLED_CFG)
        return cls(**values)

    def caption(self) -> str:
        """How a grid's title names the settings: 'seed 0 · 20 steps · cfg 4'."""
        return f"seed {self.seed}{SEP}{self.steps} steps{SEP}cfg {self.cfg:g}"


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


def encode_prompts(clip, prompts: Sequence[str]) -> list:
    """One CONDITIONING per prompt, exactly as CLIPTextEncode encodes it."""
    if clip is None:
        raise ValueError("no CLIP connected: connect a CLIP loader to encode the prompts.")
    return [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in prompts]


# ------------------------------------------------------------------------------------------------ many frames


@dataclass
class FrameTimes:
    """Seconds of each frame's sampling and of the decoding, for the log and the docs' figures: wall clock, and
    the process's CPU time (all threads), which a busy shared machine inflates less than the wall clock."""

    sampling: list[float] = field(default_factory=list)
    sampling_cpu: list[float] = field(default_factory=list)
    decode: float = 0.0
    decode_cpu: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.sampling) + self.decode

    @property
    def total_cpu(self) -> float:
        return sum(self.sampling_cpu) + self.decode_cpu

    @staticmethod
    def _after_first(values: list[float]) -> float:
        """Mean of the frames after the first (the first also pays for loading the model)."""
        rest = values[1:]
        return sum(rest) / len(rest) if rest else float("nan")

    def per_extra_frame(self) -> float:
        return self._after_first(self.sampling)

    def per_extra_frame_cpu(self) -> float:
        return self._after_first(self.sampling_cpu)

    def line(self) -> str:
        first = self.sampling[0] if self.sampling else float("nan")
        return (
            f"{len(self.sampling)} frames in {self.total:.2f} s (first frame {first:.2f} s, "
            f"{self.per_extra_frame():.3f} s per extra frame, decode {self.decode:.2f} s; "
            f"CPU time {self.total_cpu:.2f} s, {self.per_extra_frame_cpu():.3f} s per extra frame)"
        )


def render_frames(jobs: Iterable[tuple], negative, settings: RenderSettings, total: int) -> tuple[Tensor, FrameTimes]:
    """Sample one frame per job (model, positive) with the same seed and settings; returns latents
    [total, 128, h/16, w/16] in job order and the timings. `jobs` is consumed lazily, so a job may build its
    model (a clone with other adapters) just before it renders and drop it right after."""
    bar = comfy.utils.ProgressBar(total)
    latents: list[Tensor] = []
    times = FrameTimes()
    for model, positive in jobs:
        start, start_cpu = time.perf_counter(), time.process_time()
        latents.append(render_latent(model, positive, negative, settings))
        times.sampling.append(time.perf_counter() - start)
        times.sampling_cpu.append(time.process_time() - start_cpu)
        bar.update_absolute(len(latents), total)
    if len(latents) != total:
        raise RuntimeError(f"the frame plan gave {len(latents)} frames, expected {total}.")
    return torch.cat(latents), times


def decode_frames(vae, samples: Tensor, times: FrameTimes | None = None) -> Tensor:
    """Latents [n, 128, h, w] -> IMAGE [n, 16h, 16w, 3], DECODE_CHUNK frames per VAE call. Decoding happens after
    all sampling, so the diffusion model stays loaded for every frame and the VAE is loaded once."""
    start, start_cpu = time.perf_counter(), time.process_time()
    images = torch.cat(
        [decode_images(samples[i : i + DECODE_CHUNK], vae) for i in range(0, samples.shape[0], DECODE_CHUNK)]
    )
    if times is not None:
        times.decode, times.decode_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return images


def scrub_folder(name: str, key: str) -> Path:
    """`<output>/klein_lora_lab/scrub/<name>/<key>`, created; `name` must be a safe folder name."""
    root = Path(folder_paths.get_output_directory()) / SCRUB_SUBFOLDER
    root.mkdir(parents=True, exist_ok=True)
    folder = child_path(root, name, key, what="scrub folder name")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ui_file(folder: Path, filename: str) -> dict[str, str]:
    subfolder = Path(folder).relative_to(folder_paths.get_output_directory()).as_posix()
    return {"filename": filename, "subfolder": subfolder, "type": "output"}


def write_scrub_output(
    node: str,
    folder: Path,
    axes: list[dict],
    frames: Sequence[tuple[tuple[int, ...], str]],
    images: Sequence[Image.Image],
    grid: Image.Image,
) -> dict:
    """Save frames (PNG), thumbnails (JPEG, longest side THUMB_SIZE) and the grid into `folder`; return the UI
    meta of the contract above. `frames` holds (coords, label) per image, in batch order."""
    entries = []
    for i, ((coords, label), image) in enumerate(zip(frames, images, strict=True)):
        frame_name, thumb_name = f"frame_{i:04d}.png", f"thumb_{i:04d}.jpg"
        atomic_write_with(folder / frame_name, lambda f, im=image: im.save(f, format="PNG", compress_level=1))
        thumb = thumbnail(image, THUMB_SIZE)
        atomic_write_with(folder / thumb_name, lambda f, im=thumb: im.save(f, format="JPEG", quality=85))
        entries.append(
            {
                "index": i,
                "coords": list(coords),
                "label": label,
                "image": _ui_file(folder, frame_name),
                "thumb": _ui_file(folder, thumb_name),
            }
        )
    atomic_write_with(folder / "grid.png", lambda f: grid.save(f, format="PNG", compress_level=1))
    return {
        "version": SCRUB_UI_VERSION,
        "node": node,
        "axes": axes,
        "frames": entries,
        "grid": _ui_file(folder, "grid.png"),
    }
