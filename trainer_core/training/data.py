"""Training items, context padding as ComfyUI does it, size buckets, and a deterministic batch order.

Items carry model-space latents (Flux2's latent format is the identity, so a VAE-encoded latent is what the
model sees) and text features. Contexts are left-padded with zeros to 512 tokens exactly as ComfyUI's
`model_base.Flux2.extra_conds` does at inference, so training sees what inference sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.klein import LATENT_CHANNELS

CONTEXT_TOKENS = 512
HOLDOUT_MIN_ITEMS = 10  # albums smaller than this validate on training items at fixed noise (nothing held out)


@dataclass(frozen=True)
class TrainItem:
    """One training example: latent [128, h, w], context [L, ctx], optional reference latents [128, h', w'].

    free_context [L', ctx]: the caption with its trigger removed (or the class word in its place), for
    preservation; None when the album was encoded without it. Not part of train_items_hash: a run keeps resuming
    whether or not its album was encoded with these."""

    latent: Tensor
    context: Tensor
    refs: tuple[Tensor, ...] = ()
    name: str = ""
    free_context: Tensor | None = None

    def __post_init__(self) -> None:
        label = f"item {self.name!r}" if self.name else "a training item"
        if self.latent.ndim != 3 or self.latent.shape[0] != LATENT_CHANNELS:
            raise ValueError(
                f"{label}: latent has shape {tuple(self.latent.shape)}, expected [128, h, w] "
                "(one FLUX.2 latent without batch dimension; encode images with the Flux2 VAE)."
            )
        if self.context.ndim != 2:
            raise ValueError(
                f"{label}: context has shape {tuple(self.context.shape)}, expected [tokens, features] "
                "(one text conditioning without batch dimension)."
            )
        if self.free_context is not None and (
            self.free_context.ndim != 2 or self.free_context.shape[-1] != self.context.shape[-1]
        ):
            raise ValueError(
                f"{label}: the trigger-free context has shape {tuple(self.free_context.shape)}, expected "
                f"[tokens, {self.context.shape[-1]}] like the caption's (encode both with the same text encoder)."
            )
        for k, ref in enumerate(self.refs):
            if ref.ndim != 3 or ref.shape[0] != LATENT_CHANNELS:
                raise ValueError(f"{label}: reference {k} has shape {tuple(ref.shape)}, expected [128, h, w].")
        if not isinstance(self.refs, tuple):
            object.__setattr__(self, "refs", tuple(self.refs))

    def bucket_key(self) -> tuple:
        """Items with the same key can share a batch: latent size, reference sizes, padded context length."""
        return (
            tuple(self.latent.shape),
            tuple(tuple(r.shape) for r in self.refs),
            max(CONTEXT_TOKENS, self.context.shape[0]),
            self.context.shape[1],
        )


def pad_context(context: Tensor, length: int = CONTEXT_TOKENS) -> Tensor:
    """Left-pad text features [.., L, ctx] with zeros to `length` tokens (longer contexts stay as they are).

    Mirrors ComfyUI's Flux2.extra_conds: `F.pad(cross_attn, (0, 0, length - L, 0))`.
    """
    missing = length - context.shape[-2]
    if missing <= 0:
        return context
    return F.pad(context, (0, 0, missing, 0))


def train_items_hash(items: Sequence[TrainItem]) -> str:
    """A sha256 over every tensor and name of the dataset, in order (run metadata, resume check)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.name.encode())
        for tensor in (item.latent, item.context, *item.refs):
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class BatchOrder:
    """A deterministic batch order: micro-batch m is a pure function of (seed, m), so a resumed run sees the
    same batches as one that never stopped.

    Each epoch shuffles the items with a generator seeded from (seed, epoch), cuts every size bucket into
    batches of at most `batch_size` items and shuffles the batches; every epoch has the same number of batches.
    """

    def __init__(self, items: Sequence[TrainItem], batch_size: int, seed: int) -> None:
        if not items:
            raise ValueError("the dataset is empty: give at least one training item.")
        self.seed = seed
        self.batch_size = batch_size
        self._keys = [item.bucket_key() for item in items]
        buckets: dict[tuple, int] = {}
        for key in self._keys:
            buckets[key] = buckets.get(key, 0) + 1
        self.batches_per_epoch = sum(-(-n // batch_size) for n in buckets.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        perm = torch.randperm(len(self._keys), generator=gen).tolist()
        buckets: dict[tuple, list[int]] = {}
        for i in perm:
            buckets.setdefault(self._keys[i], []).append(i)
        batches = [b[j : j + self.batch_size] for b in buckets.values() for j in range(0, len(b), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, micro_step: int) -> list[int]:
        """Item indices of micro-batch `micro_step` (0-based over the whole run)."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return self._plan(epoch)[index]


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for one random stream at one position (e.g. 'noise', step, micro) of a run seeded `seed`."""
    text = ":".join([str(seed), stream, *map(str, indices)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Batch:
    """Batched tensors on the training device: x0 [b, 128, h, w], context [b, 512, ctx], refs [b, 128, h', w'],
    free_context [b, 512, ctx] (the trigger-free captions; None unless every chosen item has one)."""

    x0: Tensor
    context: Tensor
    refs: tuple[Tensor, ...]
    names: tuple[str, ...]
    free_context: Tensor | None = None


def _stack_contexts(contexts: Sequence[Tensor]) -> Tensor:
    """Contexts [L, ctx] left-padded to 512 tokens and stacked [b, 512, ctx]."""
    padded = [pad_context(c.to(torch.float32)) for c in contexts]
    lengths = {c.shape[0] for c in padded}
    if len(lengths) != 1:
        # Only contexts longer than 512 tokens can differ; pad them on the left as ComfyUI batches conds.
        padded = [pad_context(c, max(lengths)) for c in padded]
    return torch.stack(padded)


def collate(
    items: Sequence[TrainItem],
    indices: Sequence[int],
    device: torch.device | str,
    drop: Sequence[bool] = (),
    empty_context: Tensor | None = None,
) -> Batch:
    """Stack the chosen items; items whose `drop` flag is set get `empty_context` (caption dropout)."""
    chosen = [items[i] for i in indices]
    contexts = []
    for k, item in enumerate(chosen):
        ctx = item.context
        if k < len(drop) and drop[k]:
            if empty_context is None:
                raise ValueError("caption dropout needs the empty-prompt conditioning (empty_context).")
            ctx = empty_context
        contexts.append(ctx)
    n_refs = len(chosen[0].refs)
    free = [it.free_context for it in chosen]
    return Batch(
        x0=torch.stack([it.latent.to(torch.float32) for it in chosen]).to(device),
        context=_stack_contexts(contexts).to(device),
        refs=tuple(torch.stack([it.refs[r].to(torch.float32) for it in chosen]).to(device) for r in range(n_refs)),
        names=tuple(it.name for it in chosen),
        free_context=None if any(c is None for c in free) else _stack_contexts(free).to(device),
    )


def holdout_split(n_items: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of an album of n_items: a fixed, seeded share held out.

    Albums under HOLDOUT_MIN_ITEMS items (or share 0) hold nothing out: every item trains and the validation
    loss runs on training items at fixed noise. Otherwise round(share·n) items, at least 1, are held out,
    chosen by a hash of (seed, index) so the same album and seed always hold out the same items.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"validation holdout share {share}: use a value in [0, 1), e.g. 0.1.")
    if share == 0.0 or n_items < HOLDOUT_MIN_ITEMS:
        return list(range(n_items)), []
    count = max(1, round(share * n_items))

    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:holdout:{i}".encode(), digest_size=8).digest()

    held = sorted(sorted(range(n_items), key=rank)[:count])
    chosen = set(held)
    return [i for i in range(n_items) if i not in chosen], held
