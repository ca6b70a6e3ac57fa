"""Constructed live-clinic validations: a run whose bicycle prompt collapses onto the album at a known step.

Three validation prompts, as the encode node's defaults: 0 album-like ("a photo of TOK"), 1 the bicycle test, 2
without the trigger. Prompt 0 drifts a little toward album item 1 as the steps go, prompt 1 is the base model's
until `collapse_at` and album item 0 itself from then on, prompt 2 stays the base's.
"""

from __future__ import annotations

import torch
from klein_lora_lab.trainer_core.analysis.live_clinic import measure_validation, prompt_groups

PROMPTS = ("a photo of TOK", "a photo of TOK riding a bicycle", "a bowl of fruit")
TRIGGER = "TOK"


def latent(seed: int) -> torch.Tensor:
    return torch.randn(128, 4, 4, generator=torch.Generator().manual_seed(seed))


def album_latents() -> list[torch.Tensor]:
    return [latent(100 + i) for i in range(4)]


def base_latents() -> torch.Tensor:
    """[3, 128, 4, 4]: the base model's renders of the three prompts."""
    return torch.stack([latent(1), latent(2), latent(3)])


def validation_latents(step: int, collapse_at: int, last_step: int) -> torch.Tensor:
    """[3, 128, 4, 4]: the renders of the constructed LoRA at `step`."""
    album, base = album_latents(), base_latents()
    t = 0.3 * step / last_step
    now = base.clone()
    now[0] = (1 - t) * base[0] + t * album[1]
    if step >= collapse_at:
        now[1] = album[0]
    return now


def constructed_run(collapse_at: int, steps: list[int]) -> list[dict]:
    """Clinic records of the constructed validations at `steps`, measured with measure_validation as the Train
    node measures each validation."""
    groups = prompt_groups(PROMPTS, TRIGGER)
    return [
        measure_validation(
            step, validation_latents(step, collapse_at, steps[-1]), base_latents(), album_latents(), groups
        )
        for step in steps
    ]
