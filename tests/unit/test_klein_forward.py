"""Unit tests of the Klein forward pass and the forward-time adapters on the tiny model."""

from __future__ import annotations

import torch
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, LoraTrainable
from klein_lora_lab.trainer_core.model.klein import klein_forward, read_shape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein

SPEC = TinySpec()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 128, 4, 6, generator=gen)
    sigma = torch.tensor([0.25, 0.9])[:batch]
    return x, sigma, tiny_conditioning(SPEC, tokens=5, batch=batch)


def _targets(model) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks"))
    }


def test_read_shape_reports_real_block_counts() -> None:
    """The shape is read from the module, not assumed: hidden, heads and block counts of the tiny spec."""
    shape = read_shape(tiny_klein(SPEC))
    assert (shape.hidden, shape.heads, shape.double_blocks, shape.single_blocks, shape.context_dim) == (
        256,
        2,
        2,
        6,
        64,
    )


def test_fresh_lora_leaves_output_unchanged() -> None:
    """A LoRA with zero-initialised B must not change the model's prediction (PEFT's init contract)."""
    model = tiny_klein(SPEC)
    lora = LoraTrainable(_targets(model), rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
    x, sigma, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(klein_forward(model, x, sigma, ctx), klein_forward(model, x, sigma, ctx, adapters=lora))


def test_checkpointed_backward_matches_plain_backward() -> None:
    """Checkpointing all blocks or a share of them gives the same LoRA gradients as a plain backward."""
    model = tiny_klein(SPEC)
    x, sigma, ctx = _inputs()
    grads = []
    for ckpt in (False, True, 0.5):
        lora = LoraTrainable(_targets(model), rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        klein_forward(model, x, sigma, ctx, adapters=lora, checkpointing=ckpt).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_stack_equals_merged_weights() -> None:
    """Forward-time deltas of two stacked LoRAs equal merging both into the base weights."""
    model = tiny_klein(SPEC)
    x, sigma, ctx = _inputs()
    stack = AdapterStack()
    merged = tiny_klein(SPEC)
    for seed, strength in ((1, 0.7), (2, -1.3)):
        lora = LoraTrainable(_targets(model), rank=3, alpha=6, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(seed + 10))
        weights = lora.weights()
        stack.set_lora(f"lora{seed}", weights, strength)
        with torch.no_grad():
            for name, w in weights.items():
                merged.get_submodule(name).weight += strength * w.delta_weight()
    with torch.no_grad():
        torch.testing.assert_close(
            klein_forward(model, x, sigma, ctx, adapters=stack),
            klein_forward(merged, x, sigma, ctx),
            rtol=1e-4,
            atol=1e-5,
        )


def test_compiled_blocks_match_eager() -> None:
    """Blocks traced by torch.compile (dynamo + AOTAutograd; the aot_eager backend keeps the CPU test fast; the
    inductor backend is exercised by the GPU benchmark) give the same prediction and LoRA gradients as eager."""
    spec = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=32)
    model = tiny_klein(spec)
    gen = torch.Generator().manual_seed(5)
    x, sigma, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.5]), tiny_conditioning(spec, 4, 1)
    outs, grads = [], []
    for compiled in (False, "aot_eager"):
        lora = LoraTrainable(_targets(model), rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        out = klein_forward(model, x, sigma, ctx, adapters=lora, checkpointing=True, compile_blocks=compiled)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_random_checkpoint_has_the_checkpoint_layout() -> None:
    """The random (benchmark) checkpoint has exactly the keys and shapes of a tiny Klein checkpoint, in bf16,
    with unit RMSNorm scales."""
    from klein_lora_lab.trainer_core.model.tiny import random_checkpoint, tiny_klein_state_dict

    spec = TinySpec(hidden=128, double_blocks=1, single_blocks=2, context_dim=16)
    ref = tiny_klein_state_dict(spec)
    rnd = random_checkpoint(spec, "cpu", seed=3)
    assert {k: tuple(v.shape) for k, v in rnd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.dtype == torch.bfloat16 for v in rnd.values())
    assert torch.equal(rnd["double_blocks.0.img_attn.norm.key_norm.scale"], torch.ones(128, dtype=torch.bfloat16))
