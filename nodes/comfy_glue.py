"""The one place where training touches ComfyUI internals.

Everything ComfyUI-specific that a training node needs lives here, so `trainer_core` stays free of ComfyUI and
the node files stay thin:

* folders: the pack's output folder (`<output>/klein_lora_lab/`), its runs folder registered as an extra
  `loras` path (checkpoints appear in the stock LoRA loaders' lists) and the encode cache folder;
* the model: loading the MODEL ComfyUI already holds onto the device (never a second copy), after unloading
  the other models (text encoder, VAE) to make room, and emptying the device cache afterwards;
* training mode: `torch.inference_mode(False)` (node execution runs under inference mode) and
  `comfy.model_management.in_training = True` (Flux's RoPE otherwise picks a kernel with no backward);
* interruption: ComfyUI raises `InterruptProcessingException` from inside every ops Linear and from the
  progress hook as soon as Cancel is pressed, which would tear a training step apart and lose the LoRA. While a
  run trains, `interrupt_deferred()` turns those raise points into no-ops so the flag stays set; the trainer
  polls it between steps (`interrupt_requested`), saves a checkpoint and returns, and the node then re-raises
  with `raise_interrupt()` so ComfyUI still reports the prompt as interrupted;
* live feedback: the progress bar with previews, a text line on the node (loss, speed, ETA) and
  `PromptServer.send_sync` events for the frontend's training panel.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from einops import einsum
from PIL import Image
from torch import Tensor, nn

LOG = logging.getLogger("klein_lora_lab")

LAB_FOLDER = "klein_lora_lab"
EVENT_STEP = "klein_lab.train.step"
EVENT_CHECKPOINT = "klein_lab.train.checkpoint"
EVENT_SAMPLE = "klein_lab.train.sample"
EVENT_DONE = "klein_lab.train.done"


# ------------------------------------------------------------------------------------------------ folders


def lab_output_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / LAB_FOLDER


def runs_dir() -> Path:
    """`<output>/klein_lora_lab/runs`: one folder per training run."""
    return lab_output_dir() / "runs"


def cache_dir() -> Path:
    """`<output>/klein_lora_lab/cache`: encoded latents/conditionings (outside runs/, so never listed as LoRAs)."""
    return lab_output_dir() / "cache"


def register_runs_folder() -> Path:
    """Create the runs folder and add it to ComfyUI's `loras` search paths (idempotent)."""
    root = runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(root))
    return root


def lora_list_name(path: Path) -> str:
    """The name under which ComfyUI's `loras` list shows a file of the runs folder (`run/checkpoints/x`)."""
    return Path(os.path.relpath(path, runs_dir())).as_posix()


def output_relative(path: Path) -> tuple[str, str]:
    """(subfolder, filename) of a file under the output folder, as ComfyUI's `/view` and ui images want them."""
    rel = Path(os.path.relpath(path, folder_paths.get_output_directory()))
    return rel.parent.as_posix(), rel.name


# ------------------------------------------------------------------------------------------------ the model


@contextmanager
def loaded_for_training(model_patcher) -> Iterator[tuple[nn.Module, torch.device]]:
    """Unload every other model, load this MODEL fully onto its device and yield (diffusion model, device).

    The diffusion model is the very module ComfyUI loaded (`model_patcher.model.diffusion_model`): no clone of
    the weights, no deepcopy. On exit the device cache is emptied; the model stays loaded for sampling next.
    """
    mm.unload_all_models()
    mm.soft_empty_cache()
    mm.load_models_gpu([model_patcher], force_full_load=True)
    try:
        yield model_patcher.model.diffusion_model, model_patcher.load_device
    finally:
        mm.cleanup_models_gc()
        mm.soft_empty_cache(force=True)


def reload_model(model_patcher) -> None:
    """Make sure the MODEL is back on its device (a VAE decode between steps may have moved it off)."""
    mm.load_models_gpu([model_patcher], force_full_load=True)


@contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on and `in_training` set, both restored afterwards whatever happens."""
    previous = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        mm.in_training = True
        try:
            yield
        finally:
            mm.in_training = previous


# ------------------------------------------------------------------------------------------------ interruption


def _defer_interrupt() -> None:
    """Stands in for throw_exception_if_processing_interrupted while training: the flag stays set for polling."""


@contextmanager
def interrupt_deferred() -> Iterator[None]:
    """While inside, Cancel sets the flag but raises nowhere; `interrupt_requested()` reads it between steps."""
    original = mm.throw_exception_if_processing_interrupted
    mm.throw_exception_if_processing_interrupted = _defer_interrupt
    try:
        yield
    finally:
        mm.throw_exception_if_processing_interrupted = original


def interrupt_requested() -> bool:
    """True once the user pressed Cancel (or /interrupt was posted) during this prompt."""
    return mm.processing_interrupted()


def raise_interrupt() -> NoReturn:
    """Clear the flag and raise ComfyUI's interruption, so the prompt ends as 'interrupted' as usual."""
    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException()


def is_interrupt(err: BaseException) -> bool:
    return isinstance(err, mm.InterruptProcessingException)


# ------------------------------------------------------------------------------------------------ feedback


def _prompt_server():
    """ComfyUI's PromptServer instance, or None when no server runs (in-process use, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket event for the frontend (ignored when no server runs)."""
    server = _prompt_server()
    if server is not None:
        server.send_sync(event, data, server.client_id)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LiveProgress:
    """Progress bar, on-node text (loss, it/s, ETA) and websocket events for one training run."""

    def __init__(self, total: int, node_id: str | None, run_name: str, first_step: int = 0) -> None:
        self.total = total
        self.node_id = node_id
        self.run_name = run_name
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.first_step = first_step
        self.started = time.perf_counter()
        self.last_loss: float | None = None
        self.bar.update_absolute(first_step, total)

    def rate(self, step: int) -> float:
        """Steps per second over this session's steps (a resumed run does not count the earlier ones)."""
        done = step - self.first_step
        elapsed = time.perf_counter() - self.started
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def line(self, step: int, loss: float, lr: float) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        return f"step {step}/{self.total} · loss {loss:.4f} · lr {lr:.2e} · {rate:.2f} it/s · ETA {format_eta(eta)}"

    def step(self, step: int, loss: float, lr: float) -> None:
        self.last_loss = loss
        self.bar.update_absolute(step, self.total)
        text = self.line(step, loss, lr)
        server = _prompt_server()
        if server is not None and self.node_id is not None:
            server.send_progress_text(text, self.node_id, server.client_id)
        send_event(
            EVENT_STEP, {"run": self.run_name, "step": step, "total": self.total, "loss": loss, "lr": lr, "text": text}
        )

    def preview(self, step: int, image: Image.Image) -> None:
        self.bar.update_absolute(step, self.total, preview=("JPEG", image, 512))


# ------------------------------------------------------------------------------------------------ images


def tensor_to_pil(image: Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, 3] (0..1) -> PIL images."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def latent_preview(latent: Tensor) -> Tensor:
    """A cheap RGB view of Flux2 latents [B, 128, h, w] -> IMAGE [B, 2h, 2w, 3], using ComfyUI's factors."""
    fmt = comfy.latent_formats.Flux2()
    x = fmt.latent_rgb_factors_reshape(latent.float().cpu())  # [B, 32, 2h, 2w]
    factors = torch.tensor(fmt.latent_rgb_factors)  # [32, 3]
    bias = torch.tensor(fmt.latent_rgb_factors_bias)
    rgb = einsum(x, factors, "b c h w, c k -> b h w k") + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1)


def decode_images(latent: Tensor, vae=None) -> Tensor:
    """Flux2 latents [B, 128, h, w] -> IMAGE [B, H, W, 3]: the VAE when given, else the latent preview."""
    if vae is None:
        return latent_preview(latent)
    images = vae.decode(latent)
    return images.reshape(-1, *images.shape[-3:])
