"""Regional compilation: the blocks compile once per block type (not once per block), and the compiled path
computes what the eager one does."""

from __future__ import annotations

import torch
from klein_lora_lab.trainer_core.lora.adapters import LoraTrainable
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def test_blocks_compile_once_per_block_type() -> None:
    """With half the blocks recomputed and a LoRA on every Linear, the number of traced graphs does not grow
    with the number of blocks (3 for 3 + 4 blocks and for 4 + 5: per block type and recompute context, where
    compiling block by block traced one per block); the prediction and LoRA gradients match eager."""
    small = _graphs(TinySpec(hidden=128, double_blocks=3, single_blocks=4, context_dim=32))
    large = _graphs(TinySpec(hidden=128, double_blocks=4, single_blocks=5, context_dim=32))
    assert small == large <= 3


def _graphs(spec: TinySpec) -> int:
    model = tiny_klein(spec)
    gen = torch.Generator().manual_seed(2)
    x, sigma, ctx = torch.randn(1, 128, 2, 2, generator=gen), torch.tensor([0.4]), tiny_conditioning(spec, 3, 1)
    backend = CountingBackend()
    outs, grads = [], []
    for compiled in (False, backend):
        lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        out = klein_forward(model, x, sigma, ctx, adapters=lora, checkpointing=0.5, compile_blocks=compiled)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    return backend.graphs
