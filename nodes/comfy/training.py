"""One training run inside ComfyUI: callbacks for progress, previews and Cancel around `trainer_core`'s loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ...trainer_core.training.trainer import TrainCallbacks, TrainResult, compiles_blocks, train
from .compile_cache import pack_compile_cache
from .data_parallel import train_on_devices
from .feedback import LiveProgress, prompt_server
from .images import decode_images, tensor_to_pil
from .interrupt import interrupt_requested
from .live_panel import RULES, ClinicSetup, LivePanel
from .model_env import (
    PartialLoadStreamer,
    loaded_for_training,
    reload_model,
    streamed_weights,
    training_mode,
    training_patcher,
)
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
        panel: LivePanel | None = None,
        checkpoint_every: int = 0,
        notices: NodeNotices | None = None,
        streamer: PartialLoadStreamer | None = None,
    ) -> None:
        self.progress, self.run, self.patcher, self.model, self.device = progress, run, model_patcher, model, device
        self.streamer = streamer  # base weights the memory plan streams stay in host memory after a VAE decode
        self.samples, self.vae, self.panel, self.checkpoint_every = samples, vae, panel, checkpoint_every
        self.notices = notices or NodeNotices(None)
        self.sample_files: list[Path] = []
        self.checkpoints: list[Path] = []
        self.val_records: list[dict] = []  # metrics records with a validation loss (the sweet spot reads them)
        self._val_loss: float | None = None

    def on_metrics(self, record: dict) -> None:
        self._val_loss = record.get("val_loss")
        if self._val_loss is not None:
            self.val_records.append({"step": record["step"], "val_loss": self._val_loss})

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        self.notices.first_step_done()
        self.progress.step(step, loss, lr)
        if self.panel is not None:
            due = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
            self.panel.on_step(step, loss, self._val_loss, due)

    def on_notice(self, text: str) -> None:
        self.notices.show(text)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(path)
        if self.panel is not None:
            self.panel.on_checkpoint(step, lora_list_name(path))

    def should_stop(self) -> bool:
        return interrupt_requested() or (self.panel is not None and self.panel.stop_requested())

    def wants_validation(self, step: int) -> bool:
        return self.panel is not None and self.panel.wants_validation()

    def _render(self, lora) -> Tensor:
        """Latents [P, 128, h, w] of the validation prompts with `lora` (None: the base model), fixed noise."""
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
        return torch.cat(latents)

    def on_validation(self, step: int, lora) -> None:
        if self.samples is None or not self.samples.contexts:
            return
        panel = self.panel
        if panel is not None:
            panel.send_phase("sampling")
            if panel.needs_base():  # the clinic's reference: the same prompts and noise on the base model, once
                base = self._render(None)
                panel.set_base(base)
                panel.on_samples(0, [ui_image(p) for p in self._save_previews(0, base)[0]])
        latents = self._render(lora)
        files, pils = self._save_previews(step, latents)
        self.sample_files.extend(files)
        self.progress.preview(step, _strip(pils))
        if panel is not None:
            panel.on_samples(step, [ui_image(p) for p in files])
            panel.on_validation_latents(step, latents, self.val_records)
            panel.send_phase("training")

    def _save_previews(self, step: int, latents: Tensor) -> tuple[list[Path], list[Image.Image]]:
        """Decode (VAE, or the latent view) and write `samples/step_<step>_prompt<i>.png`; (files, images)."""
        images = tensor_to_pil(decode_images(latents, self.vae))
        if self.vae is not None:
            reload_model(self.patcher, self.streamer)  # decoding may have moved the diffusion model off the device
        files = []
        for i, pil in enumerate(images):
            path = self.run.sample_path(step, f"prompt{i}.png")
            atomic_write_with(path, lambda f, pil=pil: pil.save(f, format="PNG"))  # never a torn preview
            files.append(path)
        return files, images


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
    status: str = "finished"  # finished | stopped | sweet_spot | cancelled | already_finished
    notices: list[str] = field(default_factory=list)  # what the node showed besides progress (memory plan, compile)


def _outcome_message(status: str, run: RunFolder, settings: TrainSettings, checkpoint: Path | None, extra: str) -> str:
    """The node's closing text: what happened, what was kept, what to do next (each on its own line)."""
    name = run.path.name
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    kept = "no checkpoint (stopped before the first step)" if checkpoint is None else lora_list_name(checkpoint)
    resume = f"To continue: resume on, run name '{name}', Queue (continues from step {step})."
    if status == "cancelled":
        return f"Cancelled at step {step}/{settings.steps}.\nKept: {kept}\n{resume}"
    if status == "stopped":
        return f"Stopped & kept at step {step}/{settings.steps}.\nKept: {kept}\n{resume}"
    if status == "sweet_spot":
        return f"Stopped at the sweet spot, step {step}/{settings.steps}.\n{extra}\nEvery checkpoint is kept.\n{resume}"
    if status == "already_finished":
        return (
            f"Run '{name}' already finished at step {step} of steps={settings.steps}: nothing was trained.\n"
            f"Kept: {kept}\nTo extend it: raise steps above {step} (e.g. {2 * step}), keep resume on and Queue."
        )
    return f"Finished {step} steps ({extra}).\nKept: {kept}"


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
    clinic: ClinicSetup | None = None,
    *,
    sweep: dict[str, Any] | None = None,
    devices: list[str] | None = None,
) -> TrainOutcome:
    """Train on the MODEL ComfyUI loaded, with progress, previews and the live panel; Cancel keeps the run, the
    panel's Stop & keep (and the sweet-spot auto-stop) end it as a success. With `devices` the run is spread
    over them instead (data_parallel.py: settings already carry the effective batch; no previews nor panel).

    `sweep` says which run of a sweep this is (LivePanel.sweep: the panel shows "run 2 of 3: ..."); None alone.
    Returns the outcome; when the run was cancelled the caller reports `message` and calls `raise_interrupt()`.
    """
    first = 0
    if resume and run.latest_resumable() is not None:
        first = checkpoint_step(run.latest_resumable())
    if resume and first >= settings.steps:
        checkpoint = run.latest_resumable()
        message = _outcome_message("already_finished", run, settings, checkpoint, "")
        _tell_node(node_id, message)
        return TrainOutcome(run, None, checkpoint, [], False, message, "already_finished")
    if devices:
        run, done, interrupted, status = train_on_devices(
            model_patcher, items, settings, run, resume, node_id, empty_context, devices
        )
        checkpoint = run.latest_checkpoint()
        extra = f"batch {settings.batch_size} over {', '.join(devices)}"
        extra += f", final loss {done.final_loss:.4f}" if done is not None else ""
        message = _outcome_message(status, run, settings, checkpoint, extra)
        _tell_node(node_id, message)
        return TrainOutcome(run, None, checkpoint, [], interrupted, message, status)
    # a clone sharing the weights (only our loading bookkeeping touches it); under dynamic VRAM a plain copy
    patcher = training_patcher(model_patcher)
    progress = LiveProgress(settings.steps, node_id, run.path.name, first)
    interrupted = False
    result = None
    with loaded_for_training(patcher) as (model, device), training_mode():
        compiling = compiles_blocks(settings, device)
        notices = NodeNotices(node_id)
        if compiling:
            notices.start_compile_clock()
        with (
            LivePanel(run.path.name, node_id, settings.steps, first, run.path, clinic, compiling, sweep) as panel,
            pack_compile_cache(compiling),
            streamed_weights(patcher, notices.compile_skipped) as streamer,
        ):
            callbacks = ComfyCallbacks(
                progress, run, patcher, model, device, samples, vae, panel, settings.checkpoint_every, notices, streamer
            )
            try:
                result = train(
                    model, items, settings, run, callbacks, empty_context, device, resume, weight_streamer=streamer
                )
                interrupted = result.stopped_early and interrupt_requested()
            except mm.InterruptProcessingException:
                interrupted = True
            finally:
                notices.first_step_done()
            checkpoint = result.last_checkpoint if result is not None else run.latest_checkpoint()
            extra = ""
            if interrupted:
                status = "cancelled"
            elif result.stopped_early and panel.stopped_at_sweet_spot():
                status = "sweet_spot"
                extra = _sweet_spot_line(panel, run)
            elif result.stopped_early:
                status = "stopped"
            else:
                status = "finished"
                extra = f"{progress.rate(result.steps_done):.2f} it/s, final loss {result.final_loss:.4f}"
            message = _outcome_message(status, run, settings, checkpoint, extra)
            if notices.summary():
                message = f"{message}\n{notices.summary()}"
            if result is not None and result.notes:  # resume fell back, found gaps or had nothing to resume
                message = f"{message}\nNote: {' '.join(result.notes)}"
            panel.done(status, message, "" if checkpoint is None else lora_list_name(checkpoint))
    if status in ("stopped", "sweet_spot", "cancelled"):
        # a Cancel seen between two steps ends the loop like a stop: run.json says what the artist did
        run.update(status="interrupted" if status == "cancelled" else status)
    _tell_node(node_id, message)
    LOG.info("Klein LoRA Lab: %s", message.replace("\n", " "))
    return TrainOutcome(run, result, checkpoint, callbacks.sample_files, interrupted, message, status, notices.lines)


def _sweet_spot_line(panel: LivePanel, run: RunFolder) -> str:
    """Which rule set the mark, at which step, and the checkpoint to keep (nearest existing one to the pick)."""
    mark = panel.clinic.mark if panel.clinic is not None else None
    if mark is None:
        return ""
    steps = [checkpoint_step(p) for p in run.checkpoints()]
    keep = min(steps, key=lambda s: (abs(s - mark.keep_step), s)) if steps else mark.keep_step
    name = lora_list_name(run.checkpoint_path(keep))
    return f"Marked at step {mark.step}: {RULES[mark.rule]} ({mark.reason}).\nKeep: {name}"


def _tell_node(node_id: str | None, message: str) -> None:
    if node_id is None:
        return
    server = prompt_server()
    if server is not None:
        server.send_progress_text(message, node_id, server.client_id)


def model_with_lora(model_patcher, lora_name: str):
    """A clone of MODEL with the trained LoRA applied at forward time (the pack's adapters: no weight patching,
    the input MODEL stays untouched); `lora_name` as the loras list shows it."""
    from .forward_loras import StackItem, apply_items

    trained, _report = apply_items(model_patcher, [StackItem(lora_name, 1.0)])
    return trained
