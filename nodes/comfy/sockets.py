"""The pack's own socket types: what flows between its nodes besides ComfyUI's MODEL, IMAGE, CONDITIONING."""

from __future__ import annotations

from comfy_api.latest import io

DATASET = io.Custom("KLEIN_DATASET")  # trainer_core.album.dataset.Dataset: an album scanned from folders
ENCODED_DATASET = io.Custom("KLEIN_ENCODED_DATASET")  # trainer_core.album.latent_cache.EncodedDataset
LORA_STACK = io.Custom("KLEIN_LORA_STACK")  # tuple[forward_loras.StackItem, ...]: LoRAs a mixer applies
