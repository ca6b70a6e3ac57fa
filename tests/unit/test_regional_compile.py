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


def test_new_shapes_reuse_one_dynamic_graph() -> None:
    """An album with several aspect buckets and short batches: the first shape compiles static, a new token count
    recompiles once with it symbolic, a new batch size once more; after that no shape traces a new graph (6
    shapes trace as many graphs as 3, at most 3× one shape's; compiling each shape static traced one set per
    shape)."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=32)
    one = _graphs_over_shapes(spec, [(1, 2, 2)])
    three = _graphs_over_shapes(spec, [(1, 2, 2), (1, 2, 3), (2, 3, 2)])
    six = _graphs_over_shapes(spec, [(1, 2, 2), (1, 2, 3), (2, 3, 2), (2, 3, 3), (1, 4, 2), (3, 2, 4)])
    assert six == three <= 3 * one


def _graphs_over_shapes(spec: TinySpec, shapes: list[tuple[int, int, int]]) -> int:
    """Graphs traced by one training-like pass per (batch, latent h, latent w)."""
    torch._dynamo.reset()
    model = tiny_klein(spec)
    backend = CountingBackend()
    lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(0))
    for batch, h, w in shapes:
        gen = torch.Generator().manual_seed(h * 10 + w)
        x = torch.randn(batch, 128, h, w, generator=gen)
        ctx = tiny_conditioning(spec, 3, batch)
        out = klein_forward(model, x, torch.full((batch,), 0.4), ctx, adapters=lora, compile_blocks=backend)
        out.square().mean().backward()
    return backend.graphs
