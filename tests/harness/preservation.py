"""A constructed album for preservation on the tiny Klein: captions that share their words with trigger-free
prompts, so a LoRA trained on them also moves those prompts (the concept leaks) unless preservation holds them.

Text features are made of random token vectors: "TOK" (2·WORD tokens), "a photo of" (3·WORD tokens, shared) and
one subject per item (2·WORD tokens), so the captions fill most of the 512 text tokens. An item's caption is
[TOK, a photo of, subject_i]; its trigger-free caption [a photo of, subject_i]. The album's latents are one
large concept pattern plus a little per-item noise, so the album term dominates the loss and a LoRA on every
Linear learns it within a hundred steps. The validation prompts are those of the live clinic: "a photo of TOK"
(album-like), "a photo of TOK riding a bicycle" (novel) and two trigger-free ones ("a photo of a bicycle", "a
photo of a subject"), measured with measure_validation as the Train node measures each validation (latent
space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from klein_lora_lab.trainer_core.analysis.live_clinic import measure_validation, prompt_groups
from klein_lora_lab.trainer_core.model.tiny import TinySpec
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.sampling import flux2_sigmas, sample
from torch import Tensor, nn

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
TRIGGER = "TOK"
PROMPTS = ("a photo of TOK", "a photo of TOK riding a bicycle", "a photo of a bicycle", "a photo of a subject")
LATENT_HW = (4, 4)
SAMPLE_STEPS = 8
WORD = 48  # tokens per word of the constructed captions
CONCEPT = 4.0  # size of the concept pattern: the album term dominates the loss, so it is learned first


@dataclass(frozen=True)
class ConstructedAlbum:
    items: list[TrainItem]
    prompt_contexts: Tensor  # [P, L, ctx], the validation prompts (equal lengths)
    album_latents: list[Tensor]


def constructed_album(n: int = 6, seed: int = 0) -> ConstructedAlbum:
    """`n` items whose captions carry the trigger, each with its trigger-free caption."""
    g = torch.Generator().manual_seed(seed)

    def words(count: int) -> Tensor:
        return torch.randn(count, SPEC.context_dim, generator=g)

    # Words span many tokens: the context is left-padded with zero tokens to 512, and short captions would leave
    # the text a small share of what the image tokens attend to (the tiny model would all but ignore it).
    trigger, photo, bicycle, subject = words(WORD * 2), words(WORD * 3), words(WORD * 2), words(WORD * 2)
    concept = CONCEPT * torch.randn(128, *LATENT_HW, generator=g)
    items = []
    for i in range(n):
        own = words(WORD * 2)
        latent = concept + 0.3 * torch.randn(128, *LATENT_HW, generator=g)
        caption = torch.cat([trigger, photo, own])
        items.append(TrainItem(latent, caption, name=f"item{i}.png", free_context=torch.cat([photo, own])))
    prompts = [
        torch.cat([trigger, photo, subject]),  # "a photo of TOK" (padded to the others' length with the subject)
        torch.cat([trigger, photo, bicycle]),
        torch.cat([photo, bicycle]),
        torch.cat([photo, subject]),
    ]
    length = max(p.shape[0] for p in prompts)
    padded = torch.stack([torch.nn.functional.pad(p, (0, 0, length - p.shape[0], 0)) for p in prompts])
    return ConstructedAlbum(items, padded, [item.latent for item in items])


def renders(model: nn.Module, album: ConstructedAlbum, adapters=None, seed: int = 7) -> Tensor:
    """The validation prompts sampled at one fixed seed [P, 128, h, w] (adapters None: the base model)."""
    p = album.prompt_contexts.shape[0]
    noise = torch.randn(1, 128, *LATENT_HW, generator=torch.Generator().manual_seed(seed)).expand(p, -1, -1, -1)
    sigmas = flux2_sigmas(SAMPLE_STEPS, LATENT_HW[0] * LATENT_HW[1])
    return sample(model, noise.contiguous(), album.prompt_contexts, sigmas, adapters=adapters)


def clinic_record(model: nn.Module, album: ConstructedAlbum, adapters, step: int = 0) -> dict:
    """concept, trigger_free_drift, ... of `adapters` against the base model, as the live clinic reads them."""
    groups = prompt_groups(PROMPTS, TRIGGER)
    return measure_validation(step, renders(model, album, adapters), renders(model, album), album.album_latents, groups)
