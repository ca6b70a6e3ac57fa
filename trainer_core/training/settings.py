"""Training settings: one frozen, validated dataclass, the course's four presets, and run.json (de)serialisation.

Every invalid value raises `SettingsError` (a ValueError) naming the field, the bad value, the allowed range
and the fix, so a node can show the message as is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import pack_error, shown

OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("bf16", "fp32")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "flux2_shift")
SAVE_DTYPES = ("bf16", "fp16", "fp32")
COMPILE_BLOCKS = ("auto", "on", "off")
# "fp8": the block Linears' matmuls on fp8 tensor cores (model/fp8_compute.py), bf16 where the GPU has none.
COMPUTE = ("bf16", "fp8")
# "share": recompute `checkpoint_share` of the blocks (runs made before memory modes existed); "auto": the
# largest no-recompute share that fits the free memory (memory.py); "fastest": no recompute; "least_memory":
# recompute every block.
MEMORY_MODES = ("share", "auto", "fastest", "least_memory")
# The adapter trained: "lora" (the fused fast path), "rslora" (the same LoRA scaled alpha/√rank instead of
# alpha/rank), "lokr" (a Kronecker product, PEFT's LoKr layer), "dora" (LoRA plus a per-row magnitude, PEFT's DoRA).
ALGORITHMS = ("lora", "rslora", "lokr", "dora")
LOKR_FACTOR_MAX = 64


@pack_error
class SettingsError(ValueError):
    """An invalid training setting; the message names the field, the value, the allowed range and the fix."""


def _fail(field: str, value: object, allowed: str, fix: str) -> SettingsError:
    return SettingsError(f"{field}={shown(value)} is not allowed: {field} must be {allowed}. Fix: {fix}")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a LoRA training run. Stored in run.json; a resumed run must use the same values.

    timestep_sampling: how training draws σ. "uniform" draws t ~ U(0, 1) and "logit_normal" draws
    t = sigmoid(N(0, 1)); either t is then mapped through Flux2's resolution-dependent shift
    σ = flux_time_shift(μ(image tokens, 50 steps), 1, t), the same map ComfyUI's Flux2Scheduler uses to sample
    Klein Base (see objective.py and docs/training-core.md). "flux2_shift" is musubi-tuner's convention: t =
    sigmoid(N(0, 1)) shifted with μ linear in the image tokens (0.5 at 256 tokens, 1.15 at 4096).
    save_dtype: dtype of the LoRA tensors in checkpoint files (resume state always keeps fp32 master weights).
    checkpoint_share: with gradient_checkpointing, the share of blocks recomputed in backward (1.0 = all: least
    memory; lower = faster, more memory; see docs/gpu-performance.md).
    memory_mode: how much of the blocks is recomputed in backward (MEMORY_MODES above); "share" uses
    gradient_checkpointing and checkpoint_share as given.
    ema_decay: 0 = off; else an exponential moving average of the LoRA weights (e.g. 0.999) is kept and saved
    beside every checkpoint as step_000500.ema.safetensors.
    compile_blocks: torch.compile the blocks ("auto" = on CUDA only: faster after a one-off compile).
    algorithm: the adapter trained (ALGORITHMS above). lokr_factor: LoKr's split of each dimension into
    factor × rest (-1: the most balanced split, as PEFT and LyCORIS); a larger factor makes a bigger w1 and a
    smaller w2.
    compute: "bf16", or "fp8": the frozen block Linears' forward and input-gradient matmuls in fp8 with row-wise
    scales (LoRA, norms and attention stay bf16); a GPU without fp8 tensor cores computes in bf16 and says so.
    validation_holdout: share of an album of at least 10 items held out of training for the validation loss
    (a fixed, seeded choice: data.holdout_split); 0, or a smaller album, validates on training items.
    preservation_weight: 0 = off; else, on a `preservation_share` of the steps, the item's caption without the
    trigger (or with the class word in its place) is trained toward the base model's own prediction at the same
    noise and σ, weighted by this (ai-toolkit's Differential Output Preservation; training/preservation.py).
    Runs made before these fields existed read them as 0 / share 1: preservation off.
    """

    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 0
    validation_every: int = 0
    targets: str = "attention"
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    timestep_sampling: str = "uniform"
    save_dtype: str = "bf16"
    checkpoint_share: float = 1.0
    compile_blocks: str = "auto"
    validation_holdout: float = 0.0
    memory_mode: str = "share"
    ema_decay: float = 0.0
    algorithm: str = "lora"
    lokr_factor: int = -1
    preservation_weight: float = 0.0
    preservation_share: float = 1.0
    compute: str = "bf16"

    def __post_init__(self) -> None:
        self._check_int("rank", 1, 1024, "use a rank between 4 and 128 (the course uses 16-32)")
        self._check_float("alpha", 1e-6, 4096.0, "keep alpha ≈ rank (alpha/rank ≈ 1 is the safe default)")
        self._check_float("learning_rate", 1e-9, 1.0, "use 1e-4 to 3e-4 (the course's range for Klein Base)")
        self._check_int("steps", 1, 1_000_000, "use 250-1200 steps (the course's range)")
        self._check_int("batch_size", 1, 64, "use batch_size 1-4 and raise grad_accum for larger batches")
        self._check_int("grad_accum", 1, 1024, "use grad_accum 1 unless you need a larger effective batch")
        self._check_choice("optimizer", OPTIMIZERS)
        self._check_choice("lr_schedule", LR_SCHEDULES)
        self._check_int("warmup_steps", 0, self.steps, f"use 0 to {self.steps} (at most steps)")
        self._check_float("weight_decay", 0.0, 1.0, "use 0 (LoRA rarely needs weight decay) or up to 0.1")
        self._check_float("grad_clip", 0.0, 1e6, "use 1.0; 0 turns clipping off")
        self._check_float("caption_dropout", 0.0, 1.0, "use 0 to 0.1 (a fraction of steps trained without caption)")
        self._check_int("seed", 0, 2**63 - 1, "use any non-negative integer")
        self._check_int("checkpoint_every", 0, 1_000_000, "use e.g. 50-250; 0 saves only at the end")
        self._check_int("sample_every", 0, 1_000_000, "use e.g. 100; 0 turns samples off")
        self._check_int("validation_every", 0, 1_000_000, "use e.g. 50; 0 turns validation loss off")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise _fail("targets", self.targets, "a non-empty target spec", "use 'attention' (the default)")
        from ..model.targeting import parse_spec  # local import: targeting imports nothing from settings

        try:
            parse_spec(self.targets)
        except ValueError as err:
            raise SettingsError(f"targets={shown(self.targets)} is not a valid target spec: {err}") from err
        self._check_choice("mixed_precision", MIXED_PRECISION)
        if not isinstance(self.gradient_checkpointing, bool):
            raise _fail("gradient_checkpointing", self.gradient_checkpointing, "True or False", "pass a bool")
        self._check_choice("timestep_sampling", TIMESTEP_SAMPLING)
        self._check_choice("save_dtype", SAVE_DTYPES)
        self._check_float("checkpoint_share", 0.0, 1.0, "use 1.0 (least memory) or e.g. 0.5 for speed")
        self._check_choice("compile_blocks", COMPILE_BLOCKS)
        self._check_choice("compute", COMPUTE)
        self._check_float("validation_holdout", 0.0, 0.5, "use 0.1 (one item in ten held out) or 0 to train on all")
        self._check_choice("memory_mode", MEMORY_MODES)
        self._check_float("ema_decay", 0.0, 0.99999, "use 0 (off) or 0.99-0.9999 (a longer average is smoother)")
        if 0.0 < self.ema_decay < 0.5:
            raise _fail("ema_decay", self.ema_decay, "0 or in [0.5, 0.99999]", "use 0 (off) or e.g. 0.999")
        self._check_choice("algorithm", ALGORITHMS)
        self._check_int("lokr_factor", -1, LOKR_FACTOR_MAX, "use -1 (the most balanced split) or e.g. 4, 8, 16")
        if self.lokr_factor == 0:
            raise _fail("lokr_factor", 0, f"-1 or in [1, {LOKR_FACTOR_MAX}]", "use -1 (the most balanced split)")
        if self.ema_decay > 0 and self.algorithm in ("lokr", "dora"):
            raise _fail(
                "ema_decay",
                self.ema_decay,
                f"0 with algorithm {self.algorithm!r} (the EMA file is a plain LoRA)",
                "use ema_decay 0, or algorithm 'lora' / 'rslora'",
            )
        self._check_float("preservation_weight", 0.0, 10.0, "use 0 (off) or 0.5-1 (as strong as the concept loss)")
        self._check_float("preservation_share", 0.0, 1.0, "use 1 (every step) or e.g. 0.5 (about every other step)")
        if self.preservation_weight > 0 and self.preservation_share == 0:
            raise _fail(
                "preservation_share",
                self.preservation_share,
                "above 0 while preservation_weight is above 0",
                "use e.g. 0.5, or set preservation_weight to 0 to turn preservation off",
            )

    # -- validation helpers -------------------------------------------------------------------------------

    def _check_int(self, field: str, lo: int, hi: int, fix: str) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _fail(field, value, f"an integer in [{lo}, {hi}]", fix)

    def _check_float(self, field: str, lo: float, hi: float, fix: str) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise _fail(field, value, f"a number in [{lo:g}, {hi:g}]", fix)
        object.__setattr__(self, field, float(value))  # ints are accepted and stored as floats (run.json)

    def _check_choice(self, field: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, field)
        if value not in choices:
            raise _fail(field, value, "one of " + ", ".join(repr(c) for c in choices), f"use {choices[0]!r}")

    # -- run.json -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> TrainSettings:
        """Settings from run.json text (or its parsed dict); unknown fields are an error, missing ones default."""
        values = json.loads(data) if isinstance(data, str) else dict(data)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SettingsError(
                f"unknown settings {unknown}: this version knows {field_names()}. Fix: remove them from run.json "
                "or update Klein LoRA Lab."
            )
        return cls(**values)

    def differences(self, other: TrainSettings) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's, other's)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def require_optimizer_installed(settings: TrainSettings) -> None:
    """adamw8bit needs bitsandbytes. Checked when training starts, not in validation, so a run.json naming
    adamw8bit still opens where bitsandbytes is missing (loss curve, diagnostics, sweet spot)."""
    if settings.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise _fail(
            "optimizer",
            settings.optimizer,
            "'adamw' when bitsandbytes is not installed",
            "install bitsandbytes (pip install bitsandbytes) or use optimizer='adamw'",
        )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainSettings)]


# The course's starting points for Klein Base 4B (DESIGN.md §6); steps are the middle of each range.
PRESETS: dict[str, dict[str, Any]] = {
    "style": {"rank": 16, "alpha": 16.0, "learning_rate": 3e-4, "steps": 650},
    "character": {"rank": 32, "alpha": 32.0, "learning_rate": 2e-4, "steps": 1000},
    "object": {"rank": 24, "alpha": 24.0, "learning_rate": 2e-4, "steps": 800},
    "image_to_image": {"rank": 32, "alpha": 32.0, "learning_rate": 1e-4, "steps": 400},
}


def preset(name: str, **overrides: Any) -> TrainSettings:
    """The settings of preset `name` with `overrides` applied on top (validated like any settings)."""
    if name not in PRESETS:
        raise SettingsError(f"preset={name!r} does not exist: use one of {sorted(PRESETS)}.")
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise SettingsError(f"unknown settings {unknown} for preset {name!r}: known fields are {field_names()}.")
    return TrainSettings(**{**PRESETS[name], **overrides})
