"""What rendered frames depend on besides the widgets, as strings: fingerprints for ComfyUI's cache
(`fingerprint_inputs`) and for the frames' folder name."""

from __future__ import annotations

import os

from ...trainer_core.album.latent_cache import fingerprint_tensors
from .encoders import conditioning_tensor, vae_identity
from .forward_loras import forward_loras_of
from .paths import lora_path


def file_identity(names: list[str]) -> list[str]:
    """Name, size and mtime of each LoRA file of the loras list: a re-trained checkpoint gives a new identity."""
    out = []
    for name in names:
        st = os.stat(lora_path(name))
        out.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return out


def model_identity(model, vae) -> str:
    """The base weights (sampled), weight patches and the pack's forward-time LoRAs already on the MODEL (a LoRA
    loader upstream), and the VAE."""
    upstream = forward_loras_of(model)
    loras = (
        [(s.label, s.strength, sorted((s.module_strength or {}).items())) for s in upstream.specs] if upstream else []
    )
    patches = model.patches_uuid if model.patches else ""
    weights = fingerprint_tensors(model.model.diffusion_model.state_dict().items(), extra=f"{loras}|{patches}")
    return f"{weights}|{vae_identity(vae)}"


def conditioning_identity(conditioning) -> str:
    return "none" if conditioning is None else fingerprint_tensors([("c", conditioning_tensor(conditioning))])
