"""One process's share of a data-parallel run: which items of every batch it computes, and the collectives that
keep every process's LoRA identical (gradients summed, the stop decision shared).

Each batch of the effective size B (settings.batch_size, the single-process run's batch) is cut into `world`
contiguous parts of B / world items; process `rank` computes part `rank`, with the slices of the same noise, σ
and caption-dropout draws the single process makes for the whole batch. Its loss is weighted by its share of
the batch (n_rank / n), so the summed gradients are the gradients of the whole batch's mean loss: the same run
as one process with batch B, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of a world of {self.world} processes: rank must be in [0, world).")

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder (checkpoints, metrics, run.json) and reports progress."""
        return self.rank == 0

    def part(self, batch: int, batch_size: int) -> slice:
        """The items of a batch of `batch` items (at most `batch_size`, the effective batch) this rank computes.
        A bucket's last, shorter batch leaves the last ranks fewer items or none."""
        per = -(-batch_size // self.world)
        return slice(min(batch, self.rank * per), min(batch, (self.rank + 1) * per))

    def all_reduce(self, params: list[nn.Parameter], losses: Tensor) -> Tensor:
        """Sum every parameter's gradient and the weighted losses [n] over the ranks, in one collective; a rank
        that had no items contributes zeros. Returns the summed losses [n]; the gradients are replaced by the
        sums."""
        flat = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=losses.device) for p in params]
            + [losses.reshape(-1).to(params[0].dtype)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return flat[offset:]

    def agree(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when rank 0 says so (Cancel is read by rank 0; every rank must stop at the same step)."""
        value = torch.tensor([1 if flag and self.main else 0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
