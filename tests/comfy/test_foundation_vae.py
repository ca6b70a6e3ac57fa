"""The random full-shape Flux2 VAE fixture is what ComfyUI's VAELoader accepts as the FLUX.2 VAE."""

from __future__ import annotations

import pytest
import torch
from harness.vae import LATENT_CHANNELS, flux2_vae_shapes

SIZE = 64


@pytest.fixture(scope="module")
def vae(comfy_root, flux2_vae_file):
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    return vae


def test_vae_loader_builds_flux2_vae_with_every_key(vae, flux2_vae_file) -> None:
    """VAELoader builds the Flux2 VAE (128 latent channels at 1/16) and every module key comes from the file."""
    from safetensors.torch import load_file

    assert vae.latent_channels == LATENT_CHANNELS
    assert vae.downscale_ratio == 16 and vae.upscale_ratio == 16
    model_keys = set(vae.first_stage_model.state_dict()) - {"bn.num_batches_tracked"}
    renamed = {
        k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv.")
        for k in flux2_vae_shapes()
    }
    assert model_keys == renamed
    sd = load_file(str(flux2_vae_file))
    loaded = vae.first_stage_model.state_dict()["decoder.conv_in.weight"].float()
    torch.testing.assert_close(loaded, sd["decoder.conv_in.weight"].float())
    assert sum(t.numel() for t in sd.values()) > 80_000_000  # full size, not a shrunken stand-in


def test_vae_encode_decode_round_trip_shapes(vae) -> None:
    """Core's VAEEncode maps a 64x64 image to a [1, 128, 4, 4] latent; VAEDecode maps it back to 64x64 RGB."""
    import nodes

    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    (latent,) = nodes.VAEEncode().encode(vae, image)
    assert latent["samples"].shape == (1, LATENT_CHANNELS, SIZE // 16, SIZE // 16)
    assert torch.isfinite(latent["samples"]).all()
    (decoded,) = nodes.VAEDecode().decode(vae, latent)
    assert decoded.shape == (1, SIZE, SIZE, 3)
    assert decoded.min() >= 0 and decoded.max() <= 1
