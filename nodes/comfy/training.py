"""One training run inside ComfyUI: callbacks for progress, previews and Cancel around `trainer_core`'s loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management as mm
import torch
from PIL import Image
from torch import Tensor, nn

from ...trainer_core.errors import check_number
from ...trainer_core.files.atomic import atomic_write_with
from ...trainer_core.model.klein import LATENT_CHANNELS
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.training.sampling import CFG_MAX, CFG_MIN, flux2_sigmas, sample
from ...trainer_core.training.settings import TrainSettings
from ...trainer_core.training.trainer import TrainCallbacks, TrainResult, train
from .feedback import EVENT_CHECKPOINT, EVENT_DONE, EVENT_SAMPLE, LiveProgress, prompt_server, send_event
from .images import decode_images, tensor_to_pil
from .interrupt import interrupt_requested
from .model_env import loaded_for_training, reload_model, training_mode
from .notices import NodeNotices
from .paths import lora_list_name, output_relative

LOG = logging.getLogger("klein_lora_lab")


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

    def __post_init__(self) -> None:  # checked before training starts, not at the first preview
        check_number(self.cfg, "sample_cfg", CFG_MIN, CFG_MAX)


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
        notices: NodeNotices | None = None,
    ) -> None:
        self.progress, self.run, self.patcher, self.model, self.device = progress, run, model_patcher, model, device
        self.samples, self.vae = samples, vae
        self.notices = notices or NodeNotices(None)
        self.sample_files: list[Path] = []
        self.checkpoints: list[Path] = []

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        self.notices.first_step_done()
        self.progress.step(step, loss, lr)

    def on_notice(self, text: str) -> None:
        self.notices.show(text)

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
            atomic_write_with(path, lambda f, pil=pil: pil.save(f, format="PNG"))  # never a torn preview
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
    notices: list[str] = field(default_factory=list)


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
    notices = NodeNotices(node_id)
    with loaded_for_training(patcher) as (model, device), training_mode():
        callbacks = ComfyCallbacks(progress, run, patcher, model, device, samples, vae, notices)
        if settings.compile_blocks == "on" or (settings.compile_blocks == "auto" and device.type == "cuda"):
            notices.start_compile_clock()
        try:
            result = train(model, items, settings, run, callbacks, empty_context, device, resume)
            interrupted = result.stopped_early
        except mm.InterruptProcessingException:
            interrupted = True
        finally:
            notices.first_step_done()
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
            f"final loss {result.final_loss:.4f}: {where}. {notices.summary()}"
        ).strip()
    if result is not None and result.notes:  # resume fell back, found gaps or had nothing to resume: say so
        message = f"{message} Note: {' '.join(result.notes)}"
    if node_id is not None:
        server = prompt_server()
        if server is not None:
            server.send_progress_text(message, node_id, server.client_id)
    send_event(EVENT_DONE, {"run": run.path.name, "interrupted": interrupted, "lora": where, "message": message})
    LOG.info("Klein LoRA Lab: %s", message)
    return TrainOutcome(run, result, checkpoint, callbacks.sample_files, interrupted, message, notices.lines)


def model_with_lora(model_patcher, lora_name: str):
    """A clone of MODEL with the trained LoRA applied at forward time (the pack's adapters: no weight patching,
    the input MODEL stays untouched); `lora_name` as the loras list shows it."""
    from .forward_loras import StackItem, apply_items

    trained, _report = apply_items(model_patcher, [StackItem(lora_name, 1.0)])
    return trained
