"""The LoRA training loop for Klein: forward-time adapters, velocity loss, checkpoints, exact resume.

Determinism: every random draw comes from a generator seeded by (settings.seed, stream, step, micro-batch)
(data.derive_seed): LoRA init, data order, noise, σ and caption dropout. The state of a run after step k is
therefore (LoRA weights, optimizer state, k), which a checkpoint stores exactly; a run stopped and resumed
produces the same losses, bit for bit on the CPU, as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import pack_error, shown
from ..files.atomic import DiskFullError
from ..lora.adapters import LoraTrainable
from ..lora.lora_file import save_adapter_file, save_lora
from ..lora.peft_trainable import PEFT_ALGORITHMS, PeftTrainable
from ..model.fp8_compute import block_weight_scales, resolve_compute
from ..model.klein import LATENT_CHANNELS, klein_forward, read_shape
from ..model.targeting import resolve_targets
from ..model.variants import detect_variant
from ..runs.runfolder import RunFolder, RunFolderError, checkpoint_step
from .data import Batch, BatchOrder, TrainItem, collate, derive_seed, holdout_split, train_items_hash
from .ema import LoraEma, ema_path
from .faults import TrainingOutOfMemoryError, out_of_memory_message
from .memory import (
    MemoryPlan,
    MemoryProbe,
    WeightStreamer,
    can_fall_back,
    cast_weight_bytes,
    check_first_step,
    default_probe,
    fall_back,
    plan_memory,
    stream_work_bytes,
)
from .objective import add_noise, flow_loss, sample_sigmas, shifted_sigmas, velocity_target
from .preservation import preservation_loss
from .settings import TrainSettings, require_optimizer_installed
from .shard import Shard

# Settings that may change between a stop and a resume: run length, cadence, file dtype and memory/speed
# switches (resuming on a smaller GPU); none of them changes what the steps already done computed.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "checkpoint_every",
        "sample_every",
        "validation_every",
        "save_dtype",
        "gradient_checkpointing",
        "checkpoint_share",
        "compile_blocks",
        "memory_mode",
        "compute",
    }
)
VALIDATION_T = (0.2, 0.4, 0.6, 0.8)  # fixed times of the validation loss (mapped through the Flux2 shift)
VALIDATION_ITEMS = 8
_SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainCallbacks:
    """Hooks into a training run; every method is optional (no-op defaults). Callbacks may raise to abort:
    the trainer then saves a checkpoint of the last finished step before the exception propagates."""

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        """After every optimizer step (1-based `step` of `total`); `seconds` is that step's wall time."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After checkpoint `path` (LoRA file) of `step` is on disk."""

    def on_validation(self, step: int, lora: Trainable) -> None:
        """Every `sample_every` steps, under torch.no_grad(): render validation previews with `lora`."""

    def on_metrics(self, record: dict[str, Any]) -> None:
        """Every metrics record as it is appended to metrics.jsonl (includes val_loss when measured)."""

    def wants_validation(self, step: int) -> bool:
        """Polled after every step: True renders validation previews now even off the `sample_every` beat
        (the artist asked for a sample at the next step)."""
        return False

    def should_stop(self) -> bool:
        """Polled after every step; True saves a checkpoint now and returns with stopped_early=True."""
        return False

    def on_notice(self, text: str) -> None:
        """A one-line status for the artist: the memory plan and its corrections, the one-off compile."""


@dataclass
class TrainResult:
    steps_done: int
    stopped_early: bool
    last_checkpoint: Path | None
    lora: Trainable
    final_loss: float
    notes: tuple[str, ...] = ()  # what resume had to say: fallback to an earlier checkpoint, gaps, nothing to resume


@pack_error
class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf; nothing was written for the bad step."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def lr_at(settings: TrainSettings, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then constant or cosine to 0."""
    base = settings.learning_rate
    if settings.warmup_steps and step <= settings.warmup_steps:
        return base * step / settings.warmup_steps
    if settings.lr_schedule == "cosine":
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def compiles_blocks(settings: TrainSettings, device: torch.device | str) -> bool:
    """Whether the run compiles its blocks: "on", or "auto" on CUDA for the fused LoRA paths. PEFT's LoKr / DoRA
    layers are left eager under auto (not measured compiled: their delta weight and norm are rebuilt per call)."""
    if settings.compile_blocks == "on":
        return True
    fused = settings.algorithm not in PEFT_ALGORITHMS
    return settings.compile_blocks == "auto" and torch.device(device).type == "cuda" and fused


# The adapter a run trains: plain LoRA / rsLoRA on the fused fast path, LoKr / DoRA through PEFT's layers.
Trainable = LoraTrainable | PeftTrainable


def _trainable(
    model: nn.Module, targets: dict[str, tuple[int, int]], settings: TrainSettings, device: torch.device
) -> Trainable:
    """The run's adapter, initialised from the seed alone (the same on every device and on resume)."""
    seed = derive_seed(settings.seed, "init")
    if settings.algorithm in PEFT_ALGORITHMS:
        return PeftTrainable(
            model, targets, settings.algorithm, settings.rank, settings.alpha, settings.lokr_factor, seed, device
        )
    gen = torch.Generator().manual_seed(seed)
    rslora = settings.algorithm == "rslora"
    return LoraTrainable(targets, settings.rank, settings.alpha, generator=gen, device=device, rslora=rslora)


def _optimizer(settings: TrainSettings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # optional; train() checked that it is importable

        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


# ----------------------------------------------------------------------------------------------------------
# Resume state: fp32 master weights and optimizer state as tensors, everything else as JSON. No pickle.


def _state_tensors(lora: Trainable, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"lora.{k}": v.detach() for k, v in lora.state_dict().items()}
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_state(lora: Trainable, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], info: dict) -> None:
    lora.load_state_dict({k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")})
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, entries in info["scalars"].items():
        per_param.setdefault(int(index), {}).update(entries)
    opt.load_state_dict({"state": per_param, "param_groups": info["param_groups"]})


# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen_base(model: nn.Module) -> Iterator[None]:
    """Base weights need no gradients; restore the caller's flags afterwards (we never keep a change)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Run:
    """One call of `train`: the loop state and the pieces that need it."""

    def __init__(
        self,
        model: nn.Module,
        items: Sequence[TrainItem],
        settings: TrainSettings,
        run: RunFolder,
        callbacks: TrainCallbacks,
        empty_context: Tensor | None,
        device: torch.device,
        probe: MemoryProbe | None = None,
        shard: Shard | None = None,
        streamer: WeightStreamer | None = None,
    ) -> None:
        self.model, self.items, self.s, self.run, self.cb = model, items, settings, run, callbacks
        self.shard = shard  # None: this process computes every batch whole
        self.main = shard is None or shard.main  # writes the LoRA files (the run folder of a follower is read-only)
        # Albums of 10+ items may hold a fixed, seeded share out for the validation loss (never trained on);
        # with validation_holdout 0 or a smaller album every item trains, as before.
        train_idx, held_idx = holdout_split(len(items), settings.validation_holdout, settings.seed)
        self.album = list(items)  # every item, held out or not, in the album's order (the per-image losses)
        self.held_idx = frozenset(held_idx)
        self.base_per_image: list[float] | None = None  # the base model's per-image losses (fixed: computed once)
        self.held_out = [items[i] for i in held_idx]
        if held_idx:
            self.items = [items[i] for i in train_idx]
        self.device = device
        self.empty = None if empty_context is None else empty_context.reshape(-1, empty_context.shape[-1])
        if settings.caption_dropout > 0 and self.empty is None:
            raise ValueError(
                f"caption_dropout={settings.caption_dropout} needs the empty-prompt conditioning: pass "
                "empty_context (the text encoder's output for an empty prompt) or set caption_dropout=0."
            )
        check_preservation_contexts(items, settings)
        self.autocast = device.type == "cuda" and settings.mixed_precision == "bf16"
        self.compile_blocks = compiles_blocks(settings, device)
        # fp8 compute where the GPU has fp8 tensor cores; elsewhere bf16 and `compute_notice` says why.
        self.compute, self.compute_notice = resolve_compute(settings.compute, device)
        self._fp8_scales: dict[str, Tensor] | None = None
        self.order = BatchOrder(self.items, settings.batch_size, settings.seed)
        self.targets = resolve_targets(model, settings.targets)
        self.lora = _trainable(model, self.targets, settings, device)
        self.opt = _optimizer(settings, list(self.lora.parameters()))
        self.ema = LoraEma(self.lora, settings.ema_decay) if settings.ema_decay > 0 else None
        lora_params = sum(p.numel() for p in self.lora.parameters())
        self.probe = probe
        blocks = [*model.double_blocks, *model.single_blocks]
        tokens = _largest_tokens(self.items)
        # A data-parallel rank holds the activations of its slice of the batch only.
        planned = settings if shard is None else replace(settings, batch_size=-(-settings.batch_size // shard.world))
        # fp8 compute saves the stored fp8 weights for backward, not bf16 copies of them (fp8_compute.py).
        casts = cast_weight_bytes(blocks) if self.compute == "bf16" else 0
        # Streaming needs the caller's loader (ComfyUI's partial loading) and a single process; PEFT's LoKr / DoRA
        # layers read their base weight directly (DoRA's norm), so they keep every weight on the device.
        self.streamer = streamer if shard is None and settings.algorithm not in PEFT_ALGORITHMS else None
        streamable = self.streamer.streamable() if self.streamer is not None else 0
        self.plan: MemoryPlan = plan_memory(
            planned,
            read_shape(model),
            tokens,
            self.compile_blocks,
            lora_params,
            probe,
            casts,
            streamable,
            stream_work_bytes(blocks),
        )
        self.apply_streaming()
        self.last_checkpoint: Path | None = None
        self.last_saved_step = -1
        self.saving = False  # True while a checkpoint is written: an error there must not trigger another save
        self.last_loss = float("nan")
        self.last_preservation: float | None = None  # the preservation loss of the last step, when it had one
        self.notes: list[str] = []  # what resume had to say (fallbacks, gaps, nothing to resume)
        self.variant = detect_variant(read_shape(model)).name
        self.dataset_hash = train_items_hash(items)

    @property
    def compiled(self) -> bool:
        """Whether the blocks run compiled now: never while base weights stream (the plan turns it off)."""
        return self.compile_blocks and self.plan.stream_bytes == 0

    def apply_streaming(self) -> None:
        """Leave the plan's bytes of base weights in host memory; the plan then says what actually went."""
        if self.plan.stream_bytes == 0 or self.streamer is None:
            return
        self.plan = replace(self.plan, stream_bytes=self.streamer.stream(self.plan.stream_bytes))

    # -- one step -------------------------------------------------------------------------------------------

    def _micro_batch(self, step: int, micro: int) -> tuple[Batch, Tensor, Tensor, float | None] | None:
        """(batch, noise, σ, share) of micro-batch `micro` of optimizer step `step`, every random draw derived
        from them.

        In a data-parallel run the draws are made for the whole batch and this rank keeps its slice (shard.py);
        `share` is its part of the batch, which weights its losses (None in a single-process run). None when this
        rank has no item of this batch."""
        s = self.s
        indices = self.order.batch((step - 1) * s.grad_accum + micro)
        b = len(indices)
        drop: list[bool] = []
        if s.caption_dropout > 0:
            g = torch.Generator().manual_seed(derive_seed(s.seed, "dropout", step, micro))
            drop = (torch.rand(b, generator=g) < s.caption_dropout).tolist()
        latent_hw = self.items[indices[0]].latent.shape[-2:]  # one bucket: every item of the batch has this size
        g_noise = torch.Generator().manual_seed(derive_seed(s.seed, "noise", step, micro))
        noise = torch.randn((b, LATENT_CHANNELS, *latent_hw), generator=g_noise)
        g_sigma = torch.Generator().manual_seed(derive_seed(s.seed, "sigma", step, micro))
        sigma = sample_sigmas(b, latent_hw[0] * latent_hw[1], g_sigma, s.timestep_sampling)
        part = slice(0, b) if self.shard is None else self.shard.part(b, s.batch_size)
        if part.stop == part.start:
            return None
        batch = collate(self.items, indices[part], self.device, drop[part], self.empty)
        share = None if self.shard is None else (part.stop - part.start) / b
        return batch, noise[part].to(self.device), sigma[part].to(self.device), share

    def _loss(
        self,
        x0: Tensor,
        noise: Tensor,
        sigma: Tensor,
        context: Tensor,
        refs: tuple[Tensor, ...],
        checkpointing: float,
        base: bool = False,
    ) -> Tensor:
        """The velocity loss with the LoRA, or with the adapters off when `base`."""
        x_t = add_noise(x0, noise, sigma)
        adapters = None if base else self.lora
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            v = klein_forward(
                self.model,
                x_t,
                sigma,
                context,
                list(refs) or None,
                adapters,
                checkpointing,
                self.compiled,
                self.compute,
                self.plan.offload,
                self.fp8_scales(),
            )
        return flow_loss(v, velocity_target(x0, noise))

    def fp8_scales(self) -> dict[str, Tensor] | None:
        """fp8 compute's block weight scales, found at the first step and kept: the base weights are frozen for
        the run (a Linear whose weight is not on the GPU then computes in bf16 and needs none)."""
        if self.compute != "fp8":
            return None
        if self._fp8_scales is None:
            self._fp8_scales = block_weight_scales(self.model, self.device)
        return self._fp8_scales

    def preserves(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of step `step` also trains preservation: a seeded draw per (step, micro), so
        a resumed run preserves on the same steps as one that never stopped."""
        s = self.s
        if s.preservation_weight == 0:
            return False
        g = torch.Generator().manual_seed(derive_seed(s.seed, "preserve", step, micro))
        return bool(torch.rand(1, generator=g).item() < s.preservation_share)

    def _preservation_loss(self, batch: Batch, noise: Tensor, sigma: Tensor) -> Tensor:
        """The trigger-free captions at the step's x_σ and σ, pulled toward the base model's prediction."""
        if batch.free_context is None:  # _Run checked every item; a batch without them is a bug, said plainly
            raise ValueError(f"preservation: items {list(batch.names)} have no trigger-free caption context.")
        x_t = add_noise(batch.x0, noise, sigma)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return preservation_loss(
                self.model,
                x_t,
                sigma,
                batch.free_context,
                self.lora,
                list(batch.refs) or None,
                self.plan.share,
                self.compiled,
                self.compute,
                self.plan.offload,
                self.fp8_scales(),
            )

    def step(self, step: int) -> tuple[float, float]:
        """Run optimizer step `step` (1-based). Returns (loss, grad norm); raises on NaN/Inf before updating."""
        s = self.s
        lr = lr_at(s, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        preserved = torch.zeros((), device=self.device)
        n_preserved = 0
        for micro in range(s.grad_accum):
            drawn = self._micro_batch(step, micro)
            if drawn is None:
                continue  # a data-parallel rank without an item of this batch: zero gradients in the sum
            batch, noise, sigma, share = drawn
            loss = self._loss(batch.x0, noise, sigma, batch.context, batch.refs, checkpointing=self.plan.share)
            if share is not None:
                loss = loss * share
            (loss / s.grad_accum).backward()  # before the preservation forward: one graph in memory at a time
            total = total + loss.detach()
            if self.preserves(step, micro):
                kept = self._preservation_loss(batch, noise, sigma)
                if share is not None:
                    kept = kept * share
                (kept * (s.preservation_weight / s.grad_accum)).backward()
                preserved = preserved + kept.detach()
                n_preserved += 1
        params = list(self.lora.parameters())
        if self.shard is not None:
            total, preserved = self.shard.all_reduce(params, torch.stack([total, preserved]))
        if s.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        # One host sync per step: the loss is reported every step and the guard must run before the update.
        loss_value, norm_value, kept_value = torch.stack(
            [total / s.grad_accum, norm.float(), preserved / max(1, n_preserved)]
        ).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value) and math.isfinite(kept_value)):
            self._diverged(step, f"the loss is {loss_value} and the gradient norm {norm_value}, not finite")
        self.last_preservation = kept_value if n_preserved else None
        self.opt.step()
        if self.ema is not None:
            self.ema.update()
        return loss_value, norm_value

    def guarded_step(self, step: int, first: bool) -> tuple[float, float]:
        """`step`, with an auto memory plan checked against the first step's peak and, when a step runs out of
        memory, retried down the fallback chain (memory.fall_back: least memory, the blocks' inputs in host memory,
        base weights streamed from host memory) until it fits or the chain ends."""
        if first and self.probe is not None:
            self.probe.reset_peak()
        fell_back = False
        while True:
            error = ""
            try:
                result = self.step(step)
            except torch.OutOfMemoryError as err:
                # Only auto falls back: a chosen mode fails with the advice (TrainingOutOfMemoryError), as it asked.
                # A data-parallel rank cannot retry alone: the others wait in the step's collective.
                if self.shard is not None or not self._can_fall_back():
                    raise
                error = str(err) or "out of memory"  # retried below, once the traceback (and activations) is gone
            if not error:
                break
            self.opt.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.plan = fall_back(self.plan, error)
            self.apply_streaming()
            self.cb.on_notice(self.plan.describe())
            fell_back = True
        if fell_back:
            return result
        if first and self.probe is not None:
            checked = check_first_step(self.plan, self.probe.peak())
            if checked != self.plan:
                self.plan = checked
                self.apply_streaming()
                self.cb.on_notice(self.plan.describe())
        return result

    def _can_fall_back(self) -> bool:
        """Whether the plan has a next step (streaming only with a streamer: without one streamable is 0)."""
        return can_fall_back(self.plan)

    def _diverged(self, step: int, what: str) -> None:
        """Stop with a message naming the step, the likely cause and the last good checkpoint."""
        s = self.s
        bad_items = [
            it.name or f"#{i}"
            for i, it in enumerate(self.items)
            if not all(torch.isfinite(t).all() for t in (it.latent, it.context, *it.refs))
        ]
        where = self.last_checkpoint.name if self.last_checkpoint else "none (no checkpoint was written yet)"
        # Only looked at once training failed, so a healthy run never pays for a scan of the base weights.
        bad_weights = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad_weights:
            cause = (
                f"the model's own weights hold NaN/Inf values ({', '.join(bad_weights[:3])}"
                f"{' ...' if len(bad_weights) > 3 else ''}): the model file is broken; download or load it again"
            )
        elif bad_items:
            cause = f"the dataset holds NaN/Inf values in items {bad_items[:5]}: re-encode those images/captions"
        else:
            cause = (
                f"the learning rate is likely too high: lower learning_rate (now {s.learning_rate:g}, the course "
                "uses 1e-4 to 3e-4), add warmup_steps, keep grad_clip at 1.0"
                + (" and use mixed_precision='fp32' if it persists" if self.autocast else "")
            )
        message = (
            f"training stopped at step {step}: {what}. "
            f"Fix: {cause}. Nothing was saved for this step; the last good checkpoint is {where}."
        )
        self.run.update(status="diverged", error=message)
        raise NonFiniteLossError(message, step, self.last_checkpoint)

    # -- validation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean velocity loss over fixed items (the held-out ones when there are, else training items), noise
        and σ (same every time: a comparable curve)."""
        s = self.s
        items = self.held_out or self.items
        n = len(items)
        k = min(n, VALIDATION_ITEMS)
        chosen = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})  # spread over the dataset
        losses = []
        for i in chosen:
            batch = collate(items, [i] * len(VALIDATION_T), self.device)
            g = torch.Generator().manual_seed(derive_seed(s.seed, "validation", i))
            noise = torch.randn(batch.x0.shape, generator=g).to(self.device)
            h, w = batch.x0.shape[-2:]
            t = torch.tensor(VALIDATION_T, dtype=torch.float64)
            sigma = shifted_sigmas(t, h * w).to(self.device)
            losses.append(self._loss(batch.x0, noise, sigma, batch.context, batch.refs, checkpointing=False))
        return torch.stack(losses).mean().item()

    @torch.no_grad()
    def _album_losses(self, base: bool) -> list[float]:
        """Every album item's velocity loss at the validation times VALIDATION_T (one forward of 4 per item, no
        backward), at one fixed noise: a number per item that moves only with the LoRA."""
        t = torch.tensor(VALIDATION_T, dtype=torch.float64)
        losses = []
        for i in range(len(self.album)):
            batch = collate(self.album, [i] * len(VALIDATION_T), self.device)
            g = torch.Generator().manual_seed(derive_seed(self.s.seed, "per_image"))
            noise = torch.randn(batch.x0.shape, generator=g).to(self.device)
            h, w = batch.x0.shape[-2:]
            sigma = shifted_sigmas(t, h * w).to(self.device)
            losses.append(self._loss(batch.x0, noise, sigma, batch.context, batch.refs, False, base=base))
        return torch.stack(losses).tolist()  # one host sync for the album

    def per_image_record(self, step: int) -> dict[str, Any]:
        """One per_image.jsonl record: each item's loss with the LoRA of `step` and with the base model.

        loss / base_loss says how much the LoRA learned an item: near 1 it barely moved (an outlier the LoRA
        does not take in), far below the album's usual ratio it was learned by heart (a likely near-duplicate)."""
        if self.base_per_image is None:
            self.base_per_image = self._album_losses(base=True)
        now = self._album_losses(base=False)
        items = [
            {"name": item.name or f"#{i}", "loss": loss, "base_loss": base, "held_out": i in self.held_idx}
            for i, (item, loss, base) in enumerate(zip(self.album, now, self.base_per_image, strict=True))
        ]
        return {"step": step, "t": list(VALIDATION_T), "items": items}

    # -- checkpoints ----------------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict[str, str]:
        s = self.s
        return {
            "klein_lab.base_model": self.variant,
            "klein_lab.rank": str(s.rank),
            "klein_lab.alpha": f"{s.alpha:g}",
            "klein_lab.algorithm": s.algorithm,
            "klein_lab.targets": s.targets,
            "klein_lab.target_modules": json.dumps(sorted(self.targets)),
            "klein_lab.step": str(step),
            "klein_lab.steps": str(s.steps),
            "klein_lab.lr": f"{s.learning_rate:g}",
            "klein_lab.loss": f"{self.last_loss:.6g}",
            "klein_lab.trigger": str(self.run.meta.get("trigger", "")),
            "klein_lab.dataset_hash": self.dataset_hash,
            "klein_lab.dataset_size": str(len(self.items)),
            "klein_lab.seed": str(s.seed),
            "klein_lab.settings": s.to_json(),
        }

    def save_checkpoint(self, step: int) -> Path:
        """State first, then the LoRA file: a visible checkpoint can always be resumed. Refuses NaN weights."""
        self.saving = True
        try:
            path = self._save_checkpoint(step)
        except DiskFullError as err:
            if not self.run.checkpoint_path(step).exists():
                self.run.state_path(step).unlink(missing_ok=True)  # a state without its LoRA only takes space
            where = self.last_checkpoint.name if self.last_checkpoint else "none (no checkpoint was written yet)"
            raise DiskFullError(f"{err} The last good checkpoint is {where}.", err.path) from err
        # Only a successful save clears the flag: after a failed one the abort handler must not try again.
        self.saving = False
        return path

    def _save_checkpoint(self, step: int) -> Path:
        if not all(bool(torch.isfinite(p).all()) for p in self.lora.parameters()):
            self._diverged(step, "the LoRA weights hold NaN/Inf")
        path = self.run.checkpoint_path(step)
        if self.main:  # the ranks of a data-parallel run hold the same LoRA and optimizer state: rank 0 writes them
            tensors, info = _state_tensors(self.lora, self.opt)
            if self.ema is not None:
                tensors.update(self.ema.state_tensors())
            info.update(step=step, seed=self.s.seed, dataset_hash=self.dataset_hash, rng="derived:seed,stream,step")
            self.run.save_state(step, tensors, info)
            if self.ema is not None:  # before the checkpoint file: a visible checkpoint has its EMA beside it
                meta = {**self.metadata(step), "klein_lab.ema_decay": f"{self.s.ema_decay:g}"}
                save_lora(ema_path(path), self.ema.weights(), meta, dtype=_SAVE_DTYPES[self.s.save_dtype])
            dtype = _SAVE_DTYPES[self.s.save_dtype]
            if isinstance(self.lora, PeftTrainable):
                meta = {**self.lora.network_metadata(), **self.metadata(step)}
                save_adapter_file(path, self.lora.file_tensors(dtype), meta, f"klein_lab.{self.lora.algorithm}.v1")
            else:
                save_lora(path, self.lora.weights(), self.metadata(step), dtype=dtype)
        self.last_checkpoint, self.last_saved_step = path, step
        self.run.update(last_step=step, status="running")
        self.cb.on_checkpoint(step, path)
        return path

    def resume(self) -> int:
        """Load the latest checkpoint whose state and LoRA file are whole; returns its step (0 when there is none).

        Nothing is written before a checkpoint has been validated: its state must open, describe this run's
        LoRA (names and shapes) and optimizer, and its LoRA file must open. A damaged latest checkpoint falls back
        to the previous good one, and `notes` says which; when none is good, RunFolderError lists why.
        """
        problems: list[str] = []
        for path in reversed(self.run.checkpoints()):
            step = checkpoint_step(path)
            if not self.run.state_path(step).is_file():
                continue  # a kill between the state and the LoRA file leaves only older checkpoints resumable
            try:
                tensors, info = self._validated_state(step)
            except RunFolderError as err:
                problems.append(str(err))
                continue
            try:
                _load_state(self.lora, self.opt, tensors, info)
                if self.ema is not None:
                    self.ema.load_state(tensors)
            except (KeyError, ValueError, TypeError, RuntimeError) as err:  # a description edited by hand
                problems.append(f"{self.run.state_path(step).name} does not load ({shown(str(err))}).")
                continue  # the next state loaded replaces the LoRA and optimizer state completely
            self.run.discard_partial_writes()  # temporary files of writes a crash cut short
            self.run.truncate_metrics(step)
            if problems:
                self.notes.append(f"resumed from step {step}, the latest good checkpoint: {' '.join(problems)}")
            self.last_checkpoint, self.last_saved_step = path, step
            records = self.run.read_metrics()
            earlier = [r["loss"] for r in records if r["step"] == step and "loss" in r]
            self.last_loss = float(earlier[-1]) if earlier else float("nan")
            missing = sorted(set(range(1, step + 1)) - {r["step"] for r in records})
            if missing:
                self.notes.append(
                    f"metrics.jsonl has no record of {len(missing)} step(s) before step {step} "
                    f"(first {missing[0]}, last {missing[-1]}): the loss curve has a gap there."
                )
            return step
        if problems:
            raise RunFolderError(
                f"cannot resume {self.run.path}: no checkpoint is whole. {' '.join(problems)} Fix: start a new run "
                "(give a new run name), or turn resume off after removing this run's folder."
            )
        self.run.discard_partial_writes()
        self.run.truncate_metrics(0)  # records of a run that died before its first checkpoint
        self.notes.append(
            f"nothing to resume: run {self.run.path.name} has no checkpoint with its resume state yet, so it "
            "started from step 0."
        )
        return 0

    def _validated_state(self, step: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The state of `step`, checked against this run's LoRA and optimizer before anything is loaded."""
        tensors, info = self.run.load_state(step)  # RunFolderError when truncated or damaged
        name = self.run.state_path(step).name
        if info.get("dataset_hash") != self.dataset_hash:
            raise ValueError(
                f"cannot resume {self.run.path}: the dataset differs from the one this run was trained on "
                "(dataset hash changed). Fix: resume with the same images and captions, or start a new run."
            )
        expected = {f"lora.{k}": tuple(v.shape) for k, v in self.lora.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("lora.")}
        if found != expected:
            differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise RunFolderError(
                f"{name} does not match run.json's LoRA (rank {self.s.rank}, targets {self.s.targets!r}): "
                f"{len(differ)} tensor(s) differ, e.g. {differ[0]} {found.get(differ[0])} vs {expected.get(differ[0])}."
            )
        groups = info.get("param_groups")
        if len(groups) != len(self.opt.param_groups) or not isinstance(info.get("scalars"), dict):
            raise RunFolderError(f"{name} holds optimizer state of another shape.")
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise RunFolderError(f"{name}: tensor {key!r} holds NaN/Inf.")
        self.run.check_checkpoint(step)
        return tensors, info


def check_preservation_contexts(items: Sequence[TrainItem], settings: TrainSettings) -> None:
    """Preservation trains each caption without its trigger: every item needs that caption's encoding."""
    if settings.preservation_weight == 0:
        return
    missing = [item.name or f"#{i}" for i, item in enumerate(items) if item.free_context is None]
    if missing:
        raise ValueError(
            f"preservation_weight={settings.preservation_weight:g} needs each caption encoded without its trigger, "
            f"and {len(missing)} of {len(items)} items were encoded without it (e.g. {shown(missing[0])}). Fix: "
            "encode the album again with 'Klein Encode Dataset' (it encodes every caption with and without the "
            "trigger), or set preservation to 0 in 'Klein Training Options'."
        )


def _largest_tokens(items: Sequence[TrainItem]) -> int:
    """Tokens per image of the album's largest item: text + image + reference tokens (what the blocks see)."""

    def tokens(item: TrainItem) -> int:
        refs = sum(r.shape[-2] * r.shape[-1] for r in item.refs)
        return item.context.shape[-2] + item.latent.shape[-2] * item.latent.shape[-1] + refs

    return max((tokens(item) for item in items), default=1)


def _check_resume_settings(run: RunFolder, settings: TrainSettings) -> None:
    diff = {k: v for k, v in run.settings.differences(settings).items() if k not in RESUMABLE_CHANGES}
    if diff:
        listed = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume {run.path} with different settings ({listed}). Fix: resume with the run's settings "
            f"(only {sorted(RESUMABLE_CHANGES)} may change) or start a new run."
        )


def train(
    model: nn.Module,
    items: Sequence[TrainItem],
    settings: TrainSettings,
    run: RunFolder,
    callbacks: TrainCallbacks | None = None,
    empty_context: Tensor | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    memory_probe: MemoryProbe | None = None,
    shard: Shard | None = None,
    weight_streamer: WeightStreamer | None = None,
) -> TrainResult:
    """Train a LoRA on `model` (Klein module names, already on `device`) and checkpoint it into `run`.

    resume=True continues from the run's latest checkpoint (optimizer state restored); resume=False needs a
    run without checkpoints. Raises NonFiniteLossError when the loss diverges (no NaN checkpoint is written),
    TrainingOutOfMemoryError (memory released, last step kept) when the device runs out of memory even with
    every block recomputed. memory_probe reads the device's memory for settings.memory_mode 'auto' (default:
    the CUDA allocator on CUDA devices, none elsewhere). shard: this process's share of a data-parallel run
    (distributed.py starts those; its run folder is read-only on every rank but 0). weight_streamer: leaves base
    weights in host memory where auto's plan needs it (ComfyUI's partial loading; None: nothing streams).
    """
    require_optimizer_installed(settings)
    cb = callbacks or TrainCallbacks()
    device = torch.device(device)
    if resume:
        _check_resume_settings(run, settings)
    elif run.checkpoints():
        raise ValueError(f"{run.path} already has checkpoints: pass resume=True to continue it, or use a new folder.")
    # ComfyUI runs nodes under inference_mode: LoRA parameters and every tensor of the loop must be created
    # outside it, so the whole run (including LoRA init and resume) happens in inference_mode(False).
    with torch.inference_mode(False), torch.enable_grad(), _frozen_base(model):
        probe = memory_probe if memory_probe is not None else default_probe(device)
        state = _Run(model, items, settings, run, cb, empty_context, device, probe, shard, weight_streamer)
        cb.on_notice(state.plan.describe())
        if state.compute_notice:
            cb.on_notice(state.compute_notice)
        step = state.resume() if resume else 0
        if resume and run.settings != settings:  # written only once the checkpoint has been validated
            run.update(settings=settings)
        first_step = step + 1
        if state.held_out:
            run.update(held_out=[item.name for item in state.held_out])
        stopped = False
        out_of_memory = ""
        state.lora.train()
        try:
            while step < settings.steps and not stopped:
                t0 = time.perf_counter()
                loss, norm = state.guarded_step(step + 1, first=step + 1 == first_step)
                step += 1
                state.last_loss = loss
                seconds = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "step": step,
                    "loss": loss,
                    "lr": lr_at(settings, step),
                    "grad_norm": norm,
                    "seconds": seconds,
                }
                if state.last_preservation is not None:
                    record["preservation_loss"] = state.last_preservation
                if settings.validation_every and step % settings.validation_every == 0 and state.main:
                    record["val_loss"] = state.validation_loss()
                    run.append_per_image(state.per_image_record(step))
                run.append_metrics(record)
                cb.on_metrics(record)
                cb.on_step(step, settings.steps, loss, record["lr"], seconds)
                if (settings.sample_every and step % settings.sample_every == 0) or cb.wants_validation(step):
                    with torch.no_grad():
                        cb.on_validation(step, state.lora)
                if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                    state.save_checkpoint(step)
                stopped = cb.should_stop() if shard is None else shard.agree(cb.should_stop(), device)
        except (NonFiniteLossError, DiskFullError):
            raise  # no further writes: the error already names the last good checkpoint
        except torch.OutOfMemoryError as err:
            # Handled below, once this block has dropped the error: its traceback holds the step's activations.
            out_of_memory = str(err) or "out of memory"
        except BaseException:
            # A callback aborted (e.g. ComfyUI's interrupt): keep the work of the last finished step.
            if step > state.last_saved_step and step > 0 and not state.saving:
                state.save_checkpoint(step)
            run.update(status="interrupted")
            raise
        if out_of_memory:
            state.opt.zero_grad(set_to_none=True)
            if step > state.last_saved_step and step > 0 and not state.saving:
                state.save_checkpoint(step)
            message = out_of_memory_message(settings, items, step, state.last_checkpoint, out_of_memory)
            run.update(status="out_of_memory", error=message)
            last = state.last_checkpoint
            del state  # LoRA, optimizer state: freed now, not whenever the caller drops the error
            raise TrainingOutOfMemoryError(message, step, last)
        if step > state.last_saved_step and step > 0:
            state.save_checkpoint(step)
    run.update(status="stopped" if stopped else "finished", last_step=step)
    return TrainResult(step, stopped, state.last_checkpoint, state.lora, state.last_loss, tuple(state.notes))
