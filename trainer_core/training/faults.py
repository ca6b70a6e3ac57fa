"""What a training run says when the device runs out of memory: the settings that reduce memory, in order.

The trainer catches `torch.OutOfMemoryError` (CUDA's OutOfMemoryError is the same class), lets the error and its
traceback go (they hold the step's activations), keeps the last finished step as a checkpoint and raises
`TrainingOutOfMemoryError` with the message built here. Pure torch: no ComfyUI import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import pack_error
from .data import TrainItem
from .settings import TrainSettings

LATENT_PIXELS = 16  # one latent cell is 16×16 pixels


@pack_error
class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory during training; the message lists the settings that need less of it."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def memory_fixes(settings: TrainSettings, items: Sequence[TrainItem]) -> list[str]:
    """The changes that lower training memory, most effective first, for the values this run uses."""
    fixes = []
    if not settings.gradient_checkpointing:
        fixes.append("turn gradient_checkpointing on (recomputes activations instead of keeping them)")
    elif settings.checkpoint_share < 1.0:
        fixes.append(f"raise checkpoint_share from {settings.checkpoint_share:g} to 1.0 (checkpoint every block)")
    if settings.batch_size > 1:
        fixes.append(
            f"lower batch_size from {settings.batch_size} to 1 and raise grad_accum to "
            f"{settings.batch_size * settings.grad_accum} (same effective batch)"
        )
    if items:
        h, w = max((tuple(it.latent.shape[-2:]) for it in items), key=lambda hw: hw[0] * hw[1])
        fixes.append(
            f"lower the dataset resolution (the largest bucket is {w * LATENT_PIXELS}×{h * LATENT_PIXELS}; "
            "512 needs about a quarter of 1024's activations)"
        )
    if settings.rank > 8:
        fixes.append(f"lower rank from {settings.rank} (e.g. to {max(4, settings.rank // 2)})")
    if settings.mixed_precision != "bf16":
        fixes.append("use mixed_precision='bf16'")
    if settings.optimizer != "adamw8bit":
        fixes.append("use optimizer='adamw8bit' (needs bitsandbytes)")
    fixes.append("load the model with weight_dtype fp8_e4m3fn in Load Diffusion Model (fp8 base weights)")
    fixes.append("close other programs that use the GPU")
    return fixes


def out_of_memory_message(
    settings: TrainSettings, items: Sequence[TrainItem], step: int, last_checkpoint: Path | None, detail: str
) -> str:
    where = last_checkpoint.name if last_checkpoint is not None else "none (no step had finished)"
    fixes = "; ".join(f"({i}) {fix}" for i, fix in enumerate(memory_fixes(settings, items), 1))
    first_line = detail.strip().splitlines()[0] if detail.strip() else "out of memory"
    return (
        f"training ran out of device memory at step {step + 1} ({first_line}). The memory was released and the "
        f"last good checkpoint is {where}; queue again with resume on to continue. Fix, in order: {fixes}."
    )
