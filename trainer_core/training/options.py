"""Training options: the choices the Training Options node adds on top of a preset (memory, optimizer, schedule,
accumulation, caption dropout, σ sampling, EMA, save dtype, compile, the adapter algorithm, preservation,
compute precision), as TrainSettings fields.

The Train node stays simple: without an options input a new run takes `TrainingOptions()` (memory "auto", the
rest as the presets train), and a resumed run keeps the options stored in its run.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .settings import TrainSettings

# What the node shows -> TrainSettings.memory_mode.
MEMORY_CHOICES = {
    "auto": "auto",
    "fastest": "fastest",
    "least memory": "least_memory",
    "recompute share": "share",
}
# The TrainSettings fields these options decide (a resumed run without an options input keeps the run's).
OPTION_FIELDS = (
    "memory_mode",
    "gradient_checkpointing",
    "checkpoint_share",
    "optimizer",
    "lr_schedule",
    "warmup_steps",
    "grad_accum",
    "caption_dropout",
    "timestep_sampling",
    "ema_decay",
    "save_dtype",
    "compile_blocks",
    "algorithm",
    "lokr_factor",
    "preservation_weight",
    "preservation_share",
    "compute",
)


@dataclass(frozen=True)
class TrainingOptions:
    """The Training Options node's output. Values are checked where they meet the preset (TrainSettings)."""

    memory: str = "auto"
    recompute_share: float = 1.0
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    caption_dropout: float = 0.0
    timestep_sampling: str = "uniform"
    ema_decay: float = 0.0
    save_dtype: str = "bf16"
    compile: str = "auto"
    algorithm: str = "lora"
    lokr_factor: int = -1
    preservation: float = 0.0
    preservation_share: float = 1.0
    compute: str = "bf16"

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_CHOICES:
            raise ValueError(f"memory={self.memory!r} is not allowed: use one of {sorted(MEMORY_CHOICES)}.")

    def overrides(self) -> dict[str, Any]:
        """TrainSettings fields (every one of OPTION_FIELDS)."""
        mode = MEMORY_CHOICES[self.memory]
        return {
            "memory_mode": mode,
            "gradient_checkpointing": True,
            "checkpoint_share": float(self.recompute_share) if mode == "share" else 1.0,
            "optimizer": self.optimizer,
            "lr_schedule": self.lr_schedule,
            "warmup_steps": self.warmup_steps,
            "grad_accum": self.grad_accum,
            "caption_dropout": self.caption_dropout,
            "timestep_sampling": self.timestep_sampling,
            "ema_decay": self.ema_decay,
            "save_dtype": self.save_dtype,
            "compile_blocks": self.compile,
            "algorithm": self.algorithm,
            "lokr_factor": self.lokr_factor,
            "preservation_weight": self.preservation,
            "preservation_share": self.preservation_share,
            "compute": self.compute,
        }


def with_options(settings: TrainSettings, options: TrainingOptions | None) -> TrainSettings:
    """`settings` with the options applied (validated again: e.g. warmup_steps may not exceed steps)."""
    return replace(settings, **(options or TrainingOptions()).overrides())


def with_default_options(settings: TrainSettings, keep: tuple[str, ...] = ()) -> TrainSettings:
    """`settings` with the options a Train node without an options input uses, except the fields in `keep` (a
    sweep's knob keeps its value): a sweep's run is then the run the Train node trains with the same widgets."""
    defaults = {k: v for k, v in TrainingOptions().overrides().items() if k not in keep}
    return replace(settings, **defaults)


def keep_run_options(settings: TrainSettings, stored: TrainSettings) -> TrainSettings:
    """`settings` with the option fields of a run's stored settings (a resume without an options input)."""
    return replace(settings, **{name: getattr(stored, name) for name in OPTION_FIELDS})
