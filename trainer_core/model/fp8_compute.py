"""fp8 compute for the frozen base Linears: their forward and input-gradient matmuls on fp8 tensor cores.

A LoRA step spends most of its GPU time in the frozen Linears (y = x Wᵀ forward, dx = dy W backward; W itself
needs no gradient). On GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) both run
through `torch._scaled_mm` on e4m3 operands with row-wise scales (one per token row of x or dy, one per output
row of W in forward and per input column of W in backward), accumulating in fp32 and writing bf16. The LoRA
path (`add_lora`), the norms and attention stay bf16; so do the Linears of the embedders and modulation.

Why hand-written: torchao's float8 training is not installed with ComfyUI and is built for Linears whose
weights train (it also computes the weight gradient in fp8); ComfyUI's own fp8 paths serve inference. What a
frozen Linear needs is one fp8 matmul whose backward returns only the input gradient. Weights are quantized on
the fly from the stored weight, so no second copy of the model is kept; a stored e4m3fn weight (a model loaded
with fp8 weights) is used as it is, with scale 1: its values are already what the matmul needs.

Why the weight's scales are computed once per run (`block_weight_scales`): the base weights are frozen, so each
Linear's row scales are constants of the run. Finding them at every call is a reduction over the whole weight
in forward and, for backward's per-column scales, a transposed reduction over it again; on Klein 4B at 1024² the
quantization kernels took ~24 of the step's 143 GPU ms. With the scales given, quantizing W is one element-wise
pass (fused with its cast), and backward reuses forward's row scales: dx = dy W = (dy · s_wᵀ) W_q, so W's
scales move onto dy's columns before dy is quantized per row, and W_q is forward's quantization, transposed.

Why a custom op (`torch.library.custom_op`, ``klein_lora_lab::frozen_fp8_mm``) and not an autograd.Function:
inside the compiled block regions Dynamo turns an autograd.Function into the `autograd_function_apply`
higher-order op, which AOTAutograd's cache refuses by default (torch/_functorch/_aot_autograd/autograd_cache.py:
`HigherOrderOperator.cacheable()` is False for it unless `autograd_cache_allow_custom_autograd_functions`), so
every new process traced the fp8 regions' forward and backward again. A custom op is an `OpOverload`, which
that cache accepts, and its backward (`register_autograd`) is traced into the backward graph like any aten op.

Why the quantization stays outside the op: the op is opaque to inductor, so whatever runs inside it runs as
eager kernels. Quantizing x (and W) is an amax reduction, a scale and a cast, ~8 separate kernels with fp32
temporaries in eager, one or two fused passes when inductor sees them. So `fp8_linear` quantizes with plain
torch ops (fused by inductor in the compiled regions) and hands the op the e4m3 operands and their scales;
the op holds only the `_scaled_mm` (a cuBLAS call either way). x and W are passed to the op as well, unread by
its forward: x so that autograd routes its gradient through the op's backward (the quantization itself is
not differentiated: it is done on x.detach()), W and its scales so the backward can make W_q again from the
stored weight (saved as the parameter itself, no copy). The backward (scale and quantize dy, W_q transposed,
`_scaled_mm`) is plain torch ops too, so inductor fuses its quantization the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
COMPUTE_CHOICES = ("bf16", "fp8")
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
_ALIGN = 16  # torch._scaled_mm needs both matmul dimensions of the weight divisible by 16
_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)
# Row-wise scales on CUDA (one per token row and weight row); False: one scale per tensor (benchmarks compare).
CUDA_ROWWISE = True


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why fp8 compute cannot run on `device` (None when it can): the notice the Train node shows."""
    if device.type != "cuda":
        return f"fp8 compute needs an NVIDIA GPU with fp8 tensor cores; this run is on {device.type}: computing in bf16"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"fp8 compute needs fp8 tensor cores (compute capability 8.9+: RTX 40xx, H100 or newer); {name} has "
            f"{capability[0]}.{capability[1]}: computing in bf16"
        )
    return None


def weight_scale(weight: Tensor, rowwise: bool = True) -> Tensor:
    """The scale that maps `weight` [n, k] onto e4m3 (see `quantize`): [n, 1] fp32 per output row, or [] per tensor;
    ones for a weight stored in e4m3 already (used as it is)."""
    if weight.dtype == FP8:
        return torch.ones((weight.shape[0], 1) if rowwise else (), dtype=torch.float32, device=weight.device)
    w = weight.detach()
    amax = w.abs().amax(dim=-1, keepdim=True) if rowwise else w.abs().amax()
    return FP8_MAX / amax.float().clamp(min=1e-12)


def quantize_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """`weight` [n, k] in e4m3 at its `weight_scale` (one element-wise pass; a stored e4m3 weight as it is)."""
    if weight.dtype == FP8:
        return weight
    return (weight.detach().float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def block_weight_scales(
    model: nn.Module, device: torch.device | None = None, rowwise: bool | None = None
) -> dict[str, Tensor]:
    """The `weight_scale` of every block Linear fp8 compute can stand in for ({"double_blocks.0.img_attn.qkv":
    [n, 1]}), on the weight's device: constants of a run, since the base weights are frozen. With `device`, only
    the weights on it (a weight streamed from host memory computes in bf16 and needs none)."""
    scales: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not name.startswith(("double_blocks.", "single_blocks.")) or not isinstance(module, nn.Linear):
            continue
        if device is not None and not _on(module.weight, torch.device(device)):
            continue
        if fp8_eligible(module, module.weight):
            kind = module.weight.device.type
            rows = (kind == "cuda" and CUDA_ROWWISE) if rowwise is None else rowwise
            with torch.no_grad():
                scales[name] = weight_scale(module.weight, rows)
    return scales


def _on(t: Tensor, device: torch.device) -> bool:
    """Whether t lives on `device` ("cuda" means the current CUDA device's kind, any index)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def quantize(t: Tensor, rowwise: bool = True) -> tuple[Tensor, Tensor]:
    """t [m, k] -> (e4m3 [m, k] row-major, inverse scale [m, 1] fp32, or [] with rowwise False).

    Each row (or the whole tensor) is scaled so its largest magnitude lands on e4m3's largest value (448):
    the full fp8 range is used and nothing overflows. t ≈ q · inverse scale.
    """
    t32 = t.float()
    amax = t32.abs().amax(dim=-1, keepdim=True) if rowwise else t32.abs().amax()
    scale = FP8_MAX / amax.clamp(min=1e-12)
    q = (t32 * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return q, scale.reciprocal()


def _fp8_mm(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, rowwise: bool) -> Tensor:
    """(qa·sa) (qb·sb)ᵀ for quantized qa [m, k] and qb [n, k] (see `quantize`): [m, n] in `out_dtype`."""
    # _scaled_mm takes b column-major ([k, n] as the transpose of a row-major [n, k]) and its scale as [1, n].
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t() if rowwise else sb, out_dtype=out_dtype)


@torch.library.custom_op("klein_lora_lab::frozen_fp8_mm", mutates_args=())
def frozen_fp8_mm(
    x2d: Tensor,
    weight: Tensor,
    qx: Tensor,
    sx: Tensor,
    w_scale: Tensor,
    qw: Tensor,
    sw: Tensor,
    out_dtype: torch.dtype,
    rowwise: bool,
) -> Tensor:
    """y [m, n] = (qx·sx) (qw·sw)ᵀ in `out_dtype`, from qx [m, k] and qw [n, k] e4m3 with their inverse scales
    ([m, 1] and [n, 1] row-wise, [] per tensor). x2d [m, k] and weight [n, k] are what qx and qw quantize, and
    w_scale the scale qw was made with (`quantize_weight`): the backward gives x2d its gradient dy W (in fp8 too)
    and the frozen weight none; the forward does not read them.
    """
    return _fp8_mm(qx, sx, qw, sw, out_dtype, rowwise)


@frozen_fp8_mm.register_fake
def _frozen_fp8_mm_fake(
    x2d: Tensor,
    weight: Tensor,
    qx: Tensor,
    sx: Tensor,
    w_scale: Tensor,
    qw: Tensor,
    sw: Tensor,
    out_dtype: torch.dtype,
    rowwise: bool,
) -> Tensor:
    return qx.new_empty((qx.shape[0], qw.shape[0]), dtype=out_dtype)


def _frozen_fp8_mm_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x2d, weight, _, _, w_scale, _, sw, _, rowwise = inputs
    # The stored parameter itself and its scales ([n, 1] each): no quantized copy is kept for backward.
    ctx.save_for_backward(weight, w_scale, sw)
    ctx.x_dtype, ctx.rowwise = x2d.dtype, rowwise


def _frozen_fp8_mm_backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
    weight, w_scale, sw = ctx.saved_tensors
    rowwise = ctx.rowwise
    # dx [m, k] = dy [m, n] @ W [n, k] ≈ (dy · swᵀ) @ W_q: W's row scales move onto dy's columns, dy is then
    # quantized per row, and W_q is forward's quantization (made again from the weight, transposed to [k, n]).
    dy_scaled = dy.float() * (sw.t() if rowwise else sw)
    qdy, sdy = quantize(dy_scaled.contiguous(), rowwise)
    qwt = quantize_weight(weight, w_scale).t().contiguous()
    ones = torch.ones((qwt.shape[0], 1) if rowwise else (), dtype=torch.float32, device=qwt.device)
    dx = _fp8_mm(qdy, sdy, qwt, ones, dy.dtype, rowwise)
    return dx.to(ctx.x_dtype), None, None, None, None, None, None, None, None


frozen_fp8_mm.register_autograd(_frozen_fp8_mm_backward, setup_context=_frozen_fp8_mm_setup)


def fp8_eligible(module: nn.Module, x: Tensor) -> bool:
    """Whether `module` is a plain frozen Linear that fp8 compute can stand in for: its weight on x's device in a
    dtype we can quantize, both dimensions divisible by 16, and no ComfyUI weight patches (a LoRA merged by
    ComfyUI, or a scaled-fp8 file, stays on ComfyUI's own path so its math is kept)."""
    if not isinstance(module, nn.Linear) or module.weight.requires_grad:
        return False
    w = module.weight
    # A tensor subclass (ComfyUI's quantized weights) keeps its own matmul.
    if type(w) not in (nn.Parameter, Tensor) or w.device != x.device or w.dtype not in _WEIGHT_DTYPES:
        return False
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return False
    if getattr(module, "scale_weight", None) is not None or getattr(module, "scale_input", None) is not None:
        return False
    return w.shape[0] % _ALIGN == 0 and w.shape[1] % _ALIGN == 0


def fp8_linear(module: nn.Module, x: Tensor, w_scale: Tensor | None = None, rowwise: bool | None = None) -> Tensor:
    """module(x) with the matmul in fp8 (see the module docstring); module(x) itself where not eligible.

    x [..., in] -> [..., out] in the autocast dtype when autocast is on (as nn.Linear under autocast), else in
    x's dtype. rowwise None: row-wise scales on CUDA, one scale per tensor elsewhere (the CPU's _scaled_mm has
    only that; it serves the tests). w_scale: the weight's `weight_scale` computed beforehand (per run), else it
    is computed here.
    """
    if not fp8_eligible(module, x):
        return module(x)
    kind = x.device.type
    rowwise = (kind == "cuda" and CUDA_ROWWISE) if rowwise is None else rowwise
    out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    x2d, weight = x.reshape(-1, x.shape[-1]), module.weight
    qx, sx = quantize(x2d.detach(), rowwise)
    if w_scale is None or w_scale.dim() != (2 if rowwise else 0):
        w_scale = weight_scale(weight, rowwise)
    qw = quantize_weight(weight, w_scale)
    y = frozen_fp8_mm(x2d, weight, qx, sx, w_scale, qw, w_scale.reciprocal(), out_dtype, rowwise)
    if module.bias is not None:
        y = y + module.bias.to(out_dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def resolve_compute(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The compute precision a run uses on `device` and, when it differs from `requested`, why (a notice)."""
    if requested not in COMPUTE_CHOICES:
        raise ValueError(f"compute={requested!r}: use one of {COMPUTE_CHOICES}.")
    if requested == "fp8":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            return "bf16", reason
    return requested, None
