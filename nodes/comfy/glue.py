"""The one place where training touches ComfyUI internals.

Everything ComfyUI-specific that a training node needs lives here, so `trainer_core` stays free of ComfyUI and
the node files stay thin:

* folders: the pack's output folder (`<output>/klein_lora_lab/`), its runs folder registered as an extra
  `loras` path (checkpoints appear in the stock LoRA loaders' lists) and the encode cache folder;
* the model: loading the MODEL ComfyUI already holds onto the device (never a second copy), after unloading
  the other models (text encoder, VAE) to make room, and emptying the device cache afterwards;
* training mode: `torch.inference_mode(False)` (node execution runs under inference mode) and
  `comfy.model_management.in_training = True` (Flux's RoPE otherwise picks a kernel with no backward);
* interruption: Cancel sets a flag that ComfyUI turns into `InterruptProcessingException` (a BaseException)
  at the next ops Linear call or progress update. The trainer saves a checkpoint of the last finished step when
  a step or callback raises, and also polls the flag between steps (`interrupt_requested`); either way the
  node reports where the checkpoint is and re-raises (`raise_interrupt`), so the prompt ends as interrupted;
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
from dataclasses import dataclass
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

from ...trainer_core.album.latent_cache import fingerprint_tensors
from ...trainer_core.files.safe_paths import resolve_inside
from ...trainer_core.model.klein import LATENT_CHANNELS
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.training.sampling import flux2_sigmas, sample
from ...trainer_core.training.settings import TrainSettings
from ...trainer_core.training.trainer import TrainCallbacks, TrainResult, train

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
    diffusion_model = model_patcher.model.diffusion_model
    normalize_inference_tensors(diffusion_model)
    try:
        yield diffusion_model, model_patcher.load_device
    finally:
        mm.cleanup_models_gc()
        mm.soft_empty_cache(force=True)


def normalize_inference_tensors(module: nn.Module) -> int:
    """Turn parameters/buffers created under inference mode into normal tensors with the same values.

    ComfyUI loads models while executing a node, i.e. under `torch.inference_mode()`, and autograd refuses to
    save inference tensors for backward (every frozen Linear weight is saved to compute the input gradient).
    Each tensor is cloned once and swapped in place of the old one, so the model never exists twice (peak
    overhead: one tensor); values, dtypes and devices are unchanged and the tensors keep working for inference.
    Returns how many tensors were converted.
    """
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    converted += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    converted += 1
    return converted


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


# ------------------------------------------------------------------------------------------------ albums


def allowed_roots() -> list[Path]:
    """The folders a typed path may point into: ComfyUI's input, output and models folders and every folder the
    user configured for a model type (extra_model_paths.yaml, --base-directory); never custom_nodes (code)."""
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir]
    for kind, (paths, _extensions) in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":
            roots.extend(paths)
    return list(dict.fromkeys(Path(r) for r in roots))


def resolve_album_folder(text: str) -> Path:
    """An album path as typed in a widget: relative to ComfyUI's input folder, or absolute inside an allowed
    folder (safe_paths refuses '..', NUL bytes, over-long names and symlinks that leave those folders)."""
    return resolve_inside(text, allowed_roots(), "album folder", base=folder_paths.get_input_directory())


def folder_fingerprint(*folders: Path) -> str:
    """Names, sizes and modification times of the folders' files: changes when the album changes, so ComfyUI
    re-scans an edited album instead of reusing its cached output."""
    parts = []
    for folder in folders:
        if not folder.is_dir():
            parts.append(f"{folder}:missing")
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                parts.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


# ------------------------------------------------------------------------------------------------ encoders


def vae_identity(vae) -> str:
    """Fingerprint of a ComfyUI VAE's weights (part of every image cache key)."""
    return "vae:" + fingerprint_tensors(vae.first_stage_model.state_dict().items())


def clip_identity(clip) -> str:
    """Fingerprint of a ComfyUI CLIP: its weights, the layer it reads and any LoRA patched onto it."""
    patcher = getattr(clip, "patcher", None)
    patches = getattr(patcher, "patches", None) or {}
    extra = (
        f"layer={getattr(clip, 'layer_idx', None)};patches={getattr(patcher, 'patches_uuid', '') if patches else ''}"
    )
    return "clip:" + fingerprint_tensors(clip.cond_stage_model.state_dict().items(), extra=extra)


def conditioning_tensor(conditioning) -> Tensor:
    """The first entry of a CONDITIONING ([[cond [B, L, ctx], {...}], ...]) as [L, ctx]."""
    if not conditioning or not isinstance(conditioning[0][0], Tensor):
        raise ValueError("the conditioning input is empty: connect a CLIP Text Encode (or similar) output.")
    cond = conditioning[0][0]
    return cond[0] if cond.ndim == 3 else cond


def clip_text_encoder(clip):
    """caption -> context [L, ctx] through the user's CLIP, exactly as CLIPTextEncode encodes a prompt."""

    def encode(text: str) -> Tensor:
        return conditioning_tensor(clip.encode_from_tokens_scheduled(clip.tokenize(text)))

    return encode


def vae_image_encoder(vae):
    """[H, W, 3] in 0..1 -> Flux2 latent [128, H/16, W/16] through the user's VAE (as VAEEncode does)."""

    def encode(pixels: Tensor) -> Tensor:
        return vae.encode(pixels[None])[0]

    return encode


def counter_progress():
    """on_progress(done, total) that drives the node's progress bar (and lets Cancel stop an encode pass)."""
    bar: list[comfy.utils.ProgressBar] = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return update


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class SampleConfig:
    """Validation previews: fixed prompts (contexts), fixed seed, Euler steps and real CFG against the empty prompt."""

    contexts: tuple[Tensor, ...]
    negative: Tensor | None
    latent_hw: tuple[int, int]  # latent (h, w) of the previews
    refs: tuple[Tensor, ...]  # reference latents for image-to-image LoRAs ([128, h, w] each)
    steps: int
    cfg: float
    seed: int


class ComfyCallbacks(TrainCallbacks):
    """Connects a training run to ComfyUI: progress, node text, events, validation previews, Cancel."""

    def __init__(
        self,
        progress: LiveProgress,
        run: RunFolder,
        model_patcher,
        model: nn.Module,
        device: torch.device,
        samples: SampleConfig | None,
        vae=None,
    ) -> None:
        self.progress, self.run, self.patcher, self.model, self.device = progress, run, model_patcher, model, device
        self.samples, self.vae = samples, vae
        self.sample_files: list[Path] = []
        self.checkpoints: list[Path] = []

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        self.progress.step(step, loss, lr)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(path)
        send_event(EVENT_CHECKPOINT, {"run": self.progress.run_name, "step": step, "lora": lora_list_name(path)})

    def should_stop(self) -> bool:
        return interrupt_requested()

    def on_validation(self, step: int, lora) -> None:
        if self.samples is None or not self.samples.contexts:
            return
        cfg = self.samples
        h, w = cfg.latent_hw
        gen = torch.Generator().manual_seed(cfg.seed)  # the same noise at every step: only the LoRA changes
        noise = torch.randn(1, LATENT_CHANNELS, h, w, generator=gen).to(self.device)
        sigmas = flux2_sigmas(cfg.steps, h * w)
        refs = [r[None].to(self.device, torch.float32) for r in cfg.refs] or None
        latents = []
        # bf16 autocast on CUDA, as the trainer's own forward: ComfyUI keeps the weights in bf16/fp8 there.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            for context in cfg.contexts:
                negative = cfg.negative if cfg.cfg != 1.0 else None
                ctx = context.to(self.device, torch.float32)
                neg = None if negative is None else negative.to(self.device, torch.float32)
                out = sample(self.model, noise, ctx, sigmas, neg, cfg.cfg, adapters=lora, refs=refs)
                latents.append(out.float())
        images = decode_images(torch.cat(latents), self.vae)
        if self.vae is not None:
            reload_model(self.patcher)  # decoding may have moved the diffusion model off the device
        files = []
        for i, pil in enumerate(tensor_to_pil(images)):
            path = self.run.sample_path(step, f"prompt{i}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            pil.save(path)
            files.append(path)
        self.sample_files.extend(files)
        self.progress.preview(step, _strip(tensor_to_pil(images)))
        send_event(
            EVENT_SAMPLE,
            {"run": self.progress.run_name, "step": step, "images": [ui_image(p) for p in files]},
        )


def _strip(images: list[Image.Image]) -> Image.Image:
    """Several previews side by side (one progress-bar preview shows all prompts)."""
    width = sum(im.width for im in images)
    strip = Image.new("RGB", (width, max(im.height for im in images)))
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    return strip


def ui_image(path: Path) -> dict[str, str]:
    """A ui image entry for a file under the output folder (what /view serves)."""
    subfolder, filename = output_relative(path)
    return {"filename": filename, "subfolder": subfolder, "type": "output"}


@dataclass
class TrainOutcome:
    run: RunFolder
    result: TrainResult | None
    checkpoint: Path | None
    sample_files: list[Path]
    interrupted: bool
    message: str


def train_in_comfy(
    model_patcher,
    items,
    settings: TrainSettings,
    run: RunFolder,
    resume: bool,
    node_id: str | None,
    samples: SampleConfig | None,
    empty_context: Tensor | None,
    vae=None,
) -> TrainOutcome:
    """Train on the MODEL ComfyUI loaded, with progress and previews; Cancel keeps the run (see module doc).

    Returns the outcome; when the run was cancelled the caller reports `message` and calls `raise_interrupt()`.
    """
    patcher = model_patcher.clone()  # shares the weights; only our loading bookkeeping touches the clone
    first = 0
    if resume and run.latest_resumable() is not None:
        first = checkpoint_step(run.latest_resumable())
    progress = LiveProgress(settings.steps, node_id, run.path.name, first)
    interrupted = False
    result = None
    with loaded_for_training(patcher) as (model, device), training_mode():
        callbacks = ComfyCallbacks(progress, run, patcher, model, device, samples, vae)
        try:
            result = train(model, items, settings, run, callbacks, empty_context, device, resume)
            interrupted = result.stopped_early
        except mm.InterruptProcessingException:
            interrupted = True
    checkpoint = result.last_checkpoint if result is not None else run.latest_checkpoint()
    where = "no checkpoint (stopped before the first step)" if checkpoint is None else lora_list_name(checkpoint)
    if interrupted:
        step = checkpoint_step(checkpoint) if checkpoint is not None else 0
        message = (
            f"Cancelled at step {step}/{settings.steps}. The run is kept: {where} (in the loras list). "
            f"Queue again with resume on and run name '{run.path.name}' to continue from step {step}."
        )
    else:
        message = (
            f"Finished {result.steps_done} steps ({progress.rate(result.steps_done):.2f} it/s), "
            f"final loss {result.final_loss:.4f}: {where}"
        )
    if node_id is not None:
        server = _prompt_server()
        if server is not None:
            server.send_progress_text(message, node_id, server.client_id)
    send_event(EVENT_DONE, {"run": run.path.name, "interrupted": interrupted, "lora": where, "message": message})
    LOG.info("Klein LoRA Lab: %s", message)
    return TrainOutcome(run, result, checkpoint, callbacks.sample_files, interrupted, message)


def model_with_lora(model_patcher, lora_name: str):
    """A clone of MODEL with the trained LoRA applied at forward time (the pack's adapters: no weight patching,
    the input MODEL stays untouched); `lora_name` as the loras list shows it."""
    from .forward_loras import StackItem, apply_items

    trained, _report = apply_items(model_patcher, [StackItem(lora_name, 1.0)])
    return trained
