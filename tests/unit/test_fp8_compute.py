"""fp8 compute for the frozen base Linears: quantization, the fp8 matmul and its input-only gradient, where it
stands aside (ComfyUI's own path), the bf16 fallback with its reason, and the option through settings."""

from __future__ import annotations

import json

import pytest
import torch
from klein_lora_lab.trainer_core.lora.adapters import LoraTrainable
from klein_lora_lab.trainer_core.model.fp8_compute import (
    FP8_MAX,
    block_weight_scales,
    fp8_eligible,
    fp8_linear,
    frozen_fp8_mm,
    quantize,
    quantize_weight,
    resolve_compute,
    weight_scale,
)
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein
from klein_lora_lab.trainer_core.training.options import TrainingOptions, with_options
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from torch import nn

# AOTAutograd's own test of whether a Dynamo graph may be cached (it raises BypassAOTAutogradCache otherwise);
# private, but it is exactly the decision the compile cache takes for the block regions.
from torch._functorch._aot_autograd.autograd_cache import check_cacheable


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_rowwise_quantize_uses_each_rows_full_range() -> None:
    """Each row's largest magnitude lands on e4m3's largest value (448) and the row comes back within e4m3's
    precision (3 mantissa bits: ≤ 1/16 relative for values in the normal range), whatever the row's scale."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 64, generator=gen) * torch.tensor([[1e-3], [1.0], [50.0], [3e3]])
    q, inv = quantize(t, rowwise=True)
    assert q.dtype == torch.float8_e4m3fn and inv.shape == (4, 1) and q.is_contiguous()
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((4,), FP8_MAX))
    back = q.float() * inv
    big = t.abs() > t.abs().amax(dim=1, keepdim=True) / 64  # away from e4m3's subnormals
    assert ((back - t).abs() <= t.abs() / 16)[big].all()


def _frozen_linear_and_inputs(seed: int, batch: int, bias: bool) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A frozen Linear 64 → 96 (weights ~N(0, 1/64)), an input x [batch, 16, 64] that requires grad and an output
    gradient dy [batch, 16, 96], drawn in that order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 96, bias=bias).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=gen) / 8)
    x = torch.randn(batch, 16, 64, generator=gen, requires_grad=True)
    return lin, x, torch.randn(batch, 16, 96, generator=gen)


def test_fp8_matmul_forward_and_input_gradient_match_bf16_and_leave_the_weight_without_gradient() -> None:
    """y = x Wᵀ and dx = dy W through fp8 agree with the full-precision matmuls (cosine ≥ 0.998); the frozen
    weight gets no gradient and is not copied for backward."""
    lin, x, dy = _frozen_linear_and_inputs(seed=1, batch=2, bias=False)
    y = fp8_linear(lin, x)
    y.backward(dy)
    assert y.shape == (2, 16, 96) and y.dtype == x.dtype
    assert _cosine(y.detach(), x.detach() @ lin.weight.t()) > 0.998
    assert _cosine(x.grad, dy @ lin.weight) > 0.998
    assert lin.weight.grad is None


def test_input_gradient_is_the_fp8_product_of_scaled_dy_and_forwards_weight_and_only_the_weight_is_saved() -> None:
    """dx = dy W computed as (dy · s_wᵀ) W_q: W's scales move onto dy's columns, dy is quantized per row (or
    tensor) and W_q is forward's quantization of W, bit for bit; it tracks the bf16 reference within fp8's
    precision (cosine ≥ 0.998); and backward keeps the stored weight itself and its scales, no other tensor (no
    quantized copy, no x)."""
    lin, x, dy = _frozen_linear_and_inputs(seed=5, batch=3, bias=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8_linear(lin, x, rowwise=False)
    y.backward(dy)
    scale = weight_scale(lin.weight, rowwise=False)
    qdy, sdy = quantize(dy.reshape(-1, 96) * scale.reciprocal(), rowwise=False)
    qw = quantize_weight(lin.weight, scale)
    expected = torch._scaled_mm(qdy, qw, scale_a=sdy, scale_b=torch.ones(()), out_dtype=torch.float32)
    assert torch.equal(x.grad, expected.view(3, 16, 64))
    reference = dy.bfloat16() @ lin.weight.bfloat16()
    assert _cosine(x.grad, reference) > 0.998
    assert saved[0].data_ptr() == lin.weight.data_ptr()
    assert len(saved) == 3 and all(t.numel() == 1 for t in saved[1:])  # per tensor here: one scale each
    assert lin.weight.grad is None


def test_scales_found_once_per_run_give_what_scales_found_at_every_call_give() -> None:
    """The block Linears' weight scales computed once (block_weight_scales, one per output row) give klein_forward
    the prediction and LoRA gradients it computes when each call finds them itself, bit for bit: the run-constant
    path changes where the work happens, not the math. Every eligible block Linear has a scale, nothing else, and
    only where its weight is on the run's device (a weight streamed from host memory computes in bf16)."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=32)
    model = tiny_klein(spec).requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    x, sigma, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.4]), tiny_conditioning(spec, 16, 1)
    scales = block_weight_scales(model, rowwise=False)
    blocks = [
        n
        for n, m in model.named_modules()
        if n.startswith(("double_blocks.", "single_blocks.")) and isinstance(m, nn.Linear)
    ]
    assert sorted(scales) == sorted(blocks) and all(t.shape == () for t in scales.values())
    assert block_weight_scales(model, torch.device("cpu"), rowwise=False).keys() == scales.keys()
    assert block_weight_scales(model, torch.device("meta"), rowwise=False) == {}  # weights elsewhere: none

    def run(fp8_scales) -> tuple[torch.Tensor, torch.Tensor]:
        lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        out = klein_forward(model, x, sigma, ctx, None, lora, 0.5, False, "fp8", fp8_scales=fp8_scales)
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in lora.parameters()])

    (out_once, grad_once), (out_each, grad_each) = run(scales), run(None)
    assert torch.equal(out_once, out_each) and torch.equal(grad_once, grad_each)


def test_a_stored_e4m3_weight_is_used_as_it_is() -> None:
    """A Linear whose weight is stored in e4m3 (a model loaded with fp8 weights) multiplies with those exact
    values at scale 1 in forward and backward: no second rounding of an already fp8 weight."""
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(64, 96, bias=False).requires_grad_(False)
    lin.weight = nn.Parameter((torch.randn(96, 64, generator=gen) * 40).to(torch.float8_e4m3fn), requires_grad=False)
    x = torch.randn(2, 8, 64, generator=gen, requires_grad=True)
    dy = torch.randn(2, 8, 96, generator=gen)
    assert fp8_eligible(lin, x)
    assert torch.equal(weight_scale(lin.weight, rowwise=False), torch.ones(()))
    assert quantize_weight(lin.weight, torch.ones(())) is lin.weight
    y = fp8_linear(lin, x, rowwise=False)
    y.backward(dy)
    w = lin.weight.float()
    assert _cosine(y.detach(), x.detach() @ w.t()) > 0.998
    assert _cosine(x.grad, dy @ w) > 0.998
    qx, sx = quantize(x.detach().reshape(-1, 64), rowwise=False)
    exact = torch._scaled_mm(qx, lin.weight.t(), scale_a=sx, scale_b=torch.ones(()), out_dtype=torch.float32)
    assert torch.equal(y.detach(), exact.view(2, 8, 96))


class _TwoLinears(nn.Module):
    """norm → Linear (bias) → GELU → Linear (no bias), both frozen Linears through fp8_linear."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128).requires_grad_(False)
        self.down = nn.Linear(128, 64, bias=False).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fp8_linear(self.up, nn.functional.layer_norm(x, (64,)), rowwise=False)
        return fp8_linear(self.down, nn.functional.gelu(h), rowwise=False)


def test_fp8_linear_compiles_into_one_cacheable_graph_that_matches_eager() -> None:
    """torch.compile(fullgraph=True) of a module with two fp8 Linears traces one graph (no graph break) in
    which each matmul is the custom op `klein_lora_lab::frozen_fp8_mm`, a graph AOTAutograd's cache accepts
    (an autograd.Function there made it bypass the cache, so every process traced the regions again); through
    AOTAutograd's forward and backward it gives the eager output and x's gradient bit for bit."""
    torch.manual_seed(6)
    module = _TwoLinears()
    x = torch.randn(2, 16, 64)
    dy = torch.randn(2, 16, 64)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    results = []
    for fn in (module, torch.compile(module, fullgraph=True, backend=backend)):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad))
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.klein_lora_lab.frozen_fp8_mm.default) == 2
    check_cacheable(graphs[0])  # raises BypassAOTAutogradCache for a graph the cache refuses
    (y_eager, dx_eager), (y_compiled, dx_compiled) = results
    assert torch.equal(y_compiled, y_eager) and torch.equal(dx_compiled, dx_eager)


def test_frozen_fp8_mm_fake_gives_the_output_shape_and_dtype() -> None:
    """Under fake tensors (how torch.compile traces) the op reports [m, n] in the requested dtype without
    running the matmul."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(32, 64), torch.empty(96, 64)
        qx, qw = torch.empty(32, 64, dtype=torch.float8_e4m3fn), torch.empty(96, 64, dtype=torch.float8_e4m3fn)
        ones = torch.empty(96, 1)
        y = frozen_fp8_mm(x, w, qx, torch.empty(32, 1), ones, qw, ones, torch.bfloat16, True)
    assert y.shape == (32, 96) and y.dtype == torch.bfloat16


def test_fp8_linear_stands_aside_where_it_cannot_stand_in() -> None:
    """A Linear with dimensions not divisible by 16, a trained weight, or ComfyUI weight patches runs its own
    forward: the result is exactly module(x)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 24, generator=gen)
    odd = nn.Linear(24, 40).requires_grad_(False)  # 24 and 40: 40 is not divisible by 16
    trained = nn.Linear(32, 32)
    patched = nn.Linear(32, 32).requires_grad_(False)
    patched.weight_function = [lambda w: w * 2]  # what ComfyUI's ops carry for a LoRA patched at cast time
    assert not fp8_eligible(odd, x) and torch.equal(fp8_linear(odd, x), odd(x))
    x32 = torch.randn(3, 32, generator=gen)
    assert not fp8_eligible(trained, x32) and torch.equal(fp8_linear(trained, x32), trained(x32))
    assert not fp8_eligible(patched, x32)
    assert fp8_eligible(nn.Linear(32, 48).requires_grad_(False), x32)


def test_fp8_compute_falls_back_to_bf16_with_the_reason_on_a_cpu() -> None:
    """On a device without fp8 tensor cores fp8 compute runs in bf16 and says why; bf16 is kept silently."""
    compute, reason = resolve_compute("fp8", torch.device("cpu"))
    assert compute == "bf16" and "fp8 compute needs" in reason and "computing in bf16" in reason
    assert resolve_compute("bf16", torch.device("cpu")) == ("bf16", None)
    with pytest.raises(ValueError, match="compute='fp16'"):
        resolve_compute("fp16", torch.device("cpu"))


def test_klein_forward_in_fp8_tracks_bf16_and_its_lora_gradients() -> None:
    """The whole forward with the block Linears in fp8 gives the prediction and LoRA gradients of the
    full-precision forward (cosine ≥ 0.99), with and without recomputed blocks and through torch.compile."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=32)
    model = tiny_klein(spec).requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    x, sigma, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.6]), tiny_conditioning(spec, 16, 1)

    def run(compute: str, checkpointing: float, compiled: object) -> tuple[torch.Tensor, torch.Tensor]:
        lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        out = klein_forward(model, x, sigma, ctx, None, lora, checkpointing, compiled, compute)
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in lora.parameters()])

    ref_out, ref_grad = run("bf16", 0.0, False)
    for checkpointing, compiled in ((0.0, False), (1.0, False), (0.5, "aot_eager")):
        out, grad = run("fp8", checkpointing, compiled)
        assert not torch.equal(out, ref_out)  # fp8 was used
        assert _cosine(out, ref_out) > 0.99 and _cosine(grad, ref_grad) > 0.99


def test_compiled_block_regions_with_fp8_compute_are_as_many_graphs_as_bf16_and_all_cacheable() -> None:
    """The Klein block regions compiled with fp8 compute (half the blocks recomputed, a LoRA on every Linear,
    the weight scales found once for the run as the trainer passes them) trace as many graphs as with bf16
    compute (neither the fp8 op nor the scales break a graph or make a block compile on its own) and
    AOTAutograd's cache accepts each of them: a new process reuses the compiled fp8 regions instead of tracing
    them again."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=32)
    model = tiny_klein(spec).requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    x, sigma, ctx = torch.randn(1, 128, 2, 2, generator=gen), torch.tensor([0.5]), tiny_conditioning(spec, 3, 1)
    graphs: dict[str, list[torch.fx.GraphModule]] = {"bf16": [], "fp8": []}
    for compute, seen in graphs.items():

        def backend(gm: torch.fx.GraphModule, example_inputs: list, seen: list = seen) -> object:
            seen.append(gm)
            return gm.forward

        lora = LoraTrainable(resolve_targets(model, "all_linear"), 4, 4, generator=torch.Generator().manual_seed(0))
        scales = block_weight_scales(model, rowwise=False) if compute == "fp8" else None
        out = klein_forward(model, x, sigma, ctx, None, lora, 0.5, backend, compute, fp8_scales=scales)
        out.square().mean().backward()
    assert 0 < len(graphs["fp8"]) == len(graphs["bf16"])
    fp8_ops = 0
    for gm in graphs["fp8"]:
        check_cacheable(gm)  # raises BypassAOTAutogradCache for a graph the cache refuses
        fp8_ops += sum(n.target is torch.ops.klein_lora_lab.frozen_fp8_mm.default for n in gm.graph.nodes)
    assert fp8_ops > 0


def test_compute_option_is_validated_stored_and_defaults_to_bf16_for_older_runs() -> None:
    """compute is a Training Option stored in run.json; a bad value names the field and the fix; a run.json
    written before the option existed reads as bf16."""
    settings = with_options(TrainSettings(steps=10), TrainingOptions(compute="fp8"))
    assert settings.compute == "fp8"
    assert TrainSettings.from_json(settings.to_json()).compute == "fp8"
    older = json.loads(TrainSettings().to_json())
    del older["compute"]
    assert TrainSettings.from_json(older).compute == "bf16"
    with pytest.raises(SettingsError, match=r"compute='fp16' is not allowed.*Fix: use 'bf16'"):
        TrainSettings(compute="fp16")


def test_block_inputs_in_host_memory_give_the_same_gradients() -> None:
    """Recomputed blocks whose inputs wait in host memory (the least-memory fallback for a small card) give
    the prediction and LoRA gradients of the usual recompute, also for the first block, whose input needs no
    gradient of its own."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=32)
    model = tiny_klein(spec).requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    x, sigma, ctx = torch.randn(1, 128, 2, 2, generator=gen), torch.tensor([0.3]), tiny_conditioning(spec, 3, 1)
    results = []
    for offload in (False, True):
        lora = LoraTrainable(resolve_targets(model, "attention"), 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.up.values():
                p.normal_(generator=torch.Generator().manual_seed(1))
        out = klein_forward(model, x, sigma, ctx, None, lora, 1.0, False, "bf16", offload)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in lora.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert all(g is not None for g in results[1][1])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)
