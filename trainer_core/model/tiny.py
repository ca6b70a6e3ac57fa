"""A tiny, randomly initialised Klein-shaped diffusion model: for tests, the demo and benchmarks on CPU.

`tiny_klein_state_dict` writes keys exactly as a FLUX.2 [klein] checkpoint names them (RMSNorm weights as
`.scale`), so ComfyUI's UNETLoader detects it as flux2. `TinyKlein` is the same network as a plain torch module
with ComfyUI's module names, run by `klein.klein_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .klein import HEAD_DIM, LATENT_CHANNELS, MLP_RATIO, TIME_EMBED_DIM, klein_forward


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny Klein. Defaults keep a CPU training step well under a second."""

    hidden: int = 256
    double_blocks: int = 2
    single_blocks: int = 6
    context_dim: int = 64
    zero_final: bool = False  # zero output layer: the model starts by predicting v = 0, as DiT pre-training does

    def __post_init__(self) -> None:
        if self.hidden % HEAD_DIM != 0 or self.hidden <= 0:
            raise ValueError(f"hidden={self.hidden}: must be a positive multiple of {HEAD_DIM} (head size).")
        if self.double_blocks < 1 or self.single_blocks < 1:
            raise ValueError("a Klein needs at least one double-stream and one single-stream block.")


# Block counts of the real models, for tiny models shaped like them (block presets, LoRA size checks).
SPEC_4B_SHAPED = TinySpec(hidden=128, double_blocks=5, single_blocks=20, context_dim=48)
SPEC_9B_SHAPED = TinySpec(hidden=128, double_blocks=8, single_blocks=24, context_dim=48)


class _Modulation(nn.Module):
    def __init__(self, hidden: int, parts: int) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, parts * hidden, bias=False)


class _QKNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_norm = nn.RMSNorm(HEAD_DIM)
        self.key_norm = nn.RMSNorm(HEAD_DIM)


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.norm = _QKNorm()
        self.proj = nn.Linear(hidden, hidden, bias=False)


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 2 * MLP_RATIO * hidden, bias=False),
        nn.Identity(),  # the SiLU gate; klein_forward applies it
        nn.Linear(MLP_RATIO * hidden, hidden, bias=False),
    )


class _DoubleBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.img_attn, self.txt_attn = _Attention(hidden), _Attention(hidden)
        self.img_mlp, self.txt_mlp = _mlp(hidden), _mlp(hidden)


class _SingleBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * MLP_RATIO * hidden, bias=False)
        self.linear2 = nn.Linear(hidden + MLP_RATIO * hidden, hidden, bias=False)
        self.norm = _QKNorm()


class _MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)


class _LastLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, LATENT_CHANNELS, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))


class TinyKlein(nn.Module):
    """A Klein diffusion model as plain torch modules, with ComfyUI's Flux2 module names."""

    def __init__(self, spec: TinySpec) -> None:
        super().__init__()
        h = spec.hidden
        self.spec = spec
        self.img_in = nn.Linear(LATENT_CHANNELS, h, bias=False)
        self.time_in = _MLPEmbedder(TIME_EMBED_DIM, h)
        self.txt_in = nn.Linear(spec.context_dim, h, bias=False)
        self.double_blocks = nn.ModuleList(_DoubleBlock(h) for _ in range(spec.double_blocks))
        self.single_blocks = nn.ModuleList(_SingleBlock(h) for _ in range(spec.single_blocks))
        self.final_layer = _LastLayer(h)
        self.double_stream_modulation_img = _Modulation(h, 6)
        self.double_stream_modulation_txt = _Modulation(h, 6)
        self.single_stream_modulation = _Modulation(h, 3)

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor, ref_latents: list[Tensor] | None = None) -> Tensor:
        return klein_forward(self, x, sigma, context, ref_latents)


def _init_(model: TinyKlein, seed: int) -> None:
    """Deterministic init: linears ~ N(0, 1/fan_in) scaled so activations stay O(1) through the depth."""
    gen = torch.Generator().manual_seed(seed)
    depth = model.spec.double_blocks + model.spec.single_blocks
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            fan_in = param.shape[1]
            std = fan_in**-0.5
            if name.endswith(("proj.weight", "linear2.weight", "mlp.2.weight")):
                std /= depth**0.5  # residual branches: keep the sum over blocks bounded
            if "modulation" in name:
                std *= 0.1  # modulation near identity, as in a trained DiT
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        if model.spec.zero_final:
            model.final_layer.linear.weight.zero_()


def tiny_klein(spec: TinySpec = TinySpec(), seed: int = 0) -> TinyKlein:
    """A seeded tiny Klein (fp32, CPU, eval mode, base weights frozen)."""
    model = TinyKlein(spec)
    _init_(model, seed)
    model.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class TinySource:
    """A tiny Klein described by its spec and seed: what a worker process builds again on its own device."""

    spec: TinySpec = TinySpec()
    seed: int = 0

    def load(self, device: torch.device) -> TinyKlein:
        return tiny_klein(self.spec, self.seed).to(device)


def to_checkpoint_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module state dict -> the key names of a FLUX.2 checkpoint file (RMSNorm `.weight` -> `.scale`)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("_norm.weight",)):
            key = key[: -len(".weight")] + ".scale"
        out[key] = value.contiguous()
    return out


def tiny_klein_state_dict(spec: TinySpec = TinySpec(), seed: int = 0) -> dict[str, Tensor]:
    """The checkpoint-style state dict of `tiny_klein(spec, seed)`."""
    return to_checkpoint_keys(tiny_klein(spec, seed).state_dict())


def random_checkpoint(spec: TinySpec, device: torch.device | str, seed: int = 0) -> dict[str, Tensor]:
    """A checkpoint-style state dict of any size (full-size Klein for benchmarks) with random bf16 values made
    directly on `device`: the module tree is built on the meta device, so no fp32 copy is ever allocated."""
    with torch.device("meta"):
        skeleton = TinyKlein(spec)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(p.shape, device=device, dtype=torch.bfloat16)
        else:
            std = p.shape[1] ** -0.5 * (0.1 if "modulation" in name else 1.0)
            out[name] = (torch.randn(p.shape, generator=gen, device=device) * std).bfloat16()
    return to_checkpoint_keys(out)


def tiny_conditioning(spec: TinySpec, tokens: int = 8, batch: int = 1, seed: int = 0) -> Tensor:
    """A random text conditioning [batch, tokens, context_dim], standing in for Qwen3 features."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, spec.context_dim, generator=gen)
