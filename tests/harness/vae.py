"""A randomly initialised, full-shape FLUX.2 VAE (~84M parameters) that ComfyUI's VAELoader detects as Flux2.

ComfyUI (comfy/sd.py, `VAE.__init__`) builds the Flux2 VAE from the LDM `Encoder`/`Decoder` branch when the
state dict has `decoder.conv_in.weight` (z_channels = its in-channels = 32) and `bn.running_mean` (batch-norm
latent: 2x2 patchify, 32 -> 128 channels, downscale 8 -> 16). BFL's checkpoint names the 1x1 convs
`encoder.quant_conv` / `decoder.post_quant_conv`, which ComfyUI renames. The key list below mirrors
`Encoder`/`Decoder` with ch=128, ch_mult=(1, 2, 4, 4), 2 res blocks, one mid attention, double_z.
No ComfyUI import is needed to write it; the comfy tier proves that VAELoader accepts every key.
"""

from __future__ import annotations

from pathlib import Path

from .fixtures import cached_file, source_hash

Z_CHANNELS = 32
LATENT_CHANNELS = 4 * Z_CHANNELS  # after the 2x2 patchify
CH = 128
CH_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
EMBED_DIM = Z_CHANNELS

Shapes = dict[str, tuple[int, ...]]


def _conv(shapes: Shapes, name: str, c_in: int, c_out: int, k: int) -> None:
    shapes[f"{name}.weight"] = (c_out, c_in, k, k)
    shapes[f"{name}.bias"] = (c_out,)


def _norm(shapes: Shapes, name: str, c: int) -> None:
    shapes[f"{name}.weight"] = (c,)
    shapes[f"{name}.bias"] = (c,)


def _resnet(shapes: Shapes, name: str, c_in: int, c_out: int) -> None:
    _norm(shapes, f"{name}.norm1", c_in)
    _conv(shapes, f"{name}.conv1", c_in, c_out, 3)
    _norm(shapes, f"{name}.norm2", c_out)
    _conv(shapes, f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(shapes, f"{name}.nin_shortcut", c_in, c_out, 1)


def _mid(shapes: Shapes, name: str, c: int) -> None:
    _resnet(shapes, f"{name}.block_1", c, c)
    _norm(shapes, f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{name}.attn_1.{proj}", c, c, 1)
    _resnet(shapes, f"{name}.block_2", c, c)


def flux2_vae_shapes() -> Shapes:
    """Every key of a FLUX.2 VAE checkpoint (BFL naming) with its shape."""
    shapes: Shapes = {}
    # Encoder: 3 -> 128, down through ch * (1, 2, 4, 4), downsample after all but the last level.
    _conv(shapes, "encoder.conv_in", 3, CH, 3)
    c_in = CH
    for level, mult in enumerate(CH_MULT):
        c_out = CH * mult
        for i in range(NUM_RES_BLOCKS):
            _resnet(shapes, f"encoder.down.{level}.block.{i}", c_in, c_out)
            c_in = c_out
        if level != len(CH_MULT) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", c_in, c_in, 3)
    _mid(shapes, "encoder.mid", c_in)
    _norm(shapes, "encoder.norm_out", c_in)
    _conv(shapes, "encoder.conv_out", c_in, 2 * Z_CHANNELS, 3)  # mean and logvar (double_z)
    _conv(shapes, "encoder.quant_conv", 2 * Z_CHANNELS, 2 * EMBED_DIM, 1)
    # Decoder: 32 -> 512, up through the levels in reverse with NUM_RES_BLOCKS + 1 blocks each.
    _conv(shapes, "decoder.post_quant_conv", EMBED_DIM, Z_CHANNELS, 1)
    c_in = CH * CH_MULT[-1]
    _conv(shapes, "decoder.conv_in", Z_CHANNELS, c_in, 3)
    _mid(shapes, "decoder.mid", c_in)
    for level in reversed(range(len(CH_MULT))):
        c_out = CH * CH_MULT[level]
        for i in range(NUM_RES_BLOCKS + 1):
            _resnet(shapes, f"decoder.up.{level}.block.{i}", c_in, c_out)
            c_in = c_out
        if level != 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", c_in, c_in, 3)
    _norm(shapes, "decoder.norm_out", c_in)
    _conv(shapes, "decoder.conv_out", c_in, 3, 3)
    # Batch-norm statistics of the patchified latent (128 channels): this key makes ComfyUI pick Flux2.
    shapes["bn.running_mean"] = (LATENT_CHANNELS,)
    shapes["bn.running_var"] = (LATENT_CHANNELS,)
    return shapes


def flux2_vae_state_dict(seed: int = 0):
    """Random weights with Flux2 VAE keys: convs ~ N(0, 1/fan_in), norms at identity, bn at (0, 1). bf16."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in flux2_vae_shapes().items():
        if key == "bn.running_var" or (key.endswith(".weight") and len(shape) == 1):
            value = torch.ones(shape)  # GroupNorm scale and batch-norm variance
        elif key == "bn.running_mean" or key.endswith(".bias"):
            value = torch.zeros(shape)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=gen) * fan_in**-0.5
        out[key] = value.to(torch.bfloat16)
    return out


def flux2_vae_path(seed: int = 0) -> Path:
    """Path of the cached random Flux2 VAE file (built once, ~170 MB in bf16)."""
    from safetensors.torch import save_file

    name = f"flux2_vae_random-seed{seed}-{source_hash((Path(__file__),))}.safetensors"

    def build(path: Path) -> None:
        save_file(flux2_vae_state_dict(seed), str(path), metadata={"klein_lab_fixture": name})

    return cached_file(name, build)
