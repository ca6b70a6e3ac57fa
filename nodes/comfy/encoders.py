"""Captions through CLIP and images through the VAE, with identities that key the encode cache."""

from __future__ import annotations

import logging
import math
import time

import comfy.latent_formats
import comfy.utils
from torch import Tensor

from ...trainer_core.album.latent_cache import fingerprint_tensors
from .feedback import prompt_server
from .live_panel import EVENT_PHASE, broadcast

LOG = logging.getLogger("klein_lora_lab")


def vae_identity(vae) -> str:
    """Fingerprint of a ComfyUI VAE's weights (part of every image cache key)."""
    return "vae:" + fingerprint_tensors(vae.first_stage_model.state_dict().items())


def clip_identity(clip) -> str:
    """Fingerprint of a ComfyUI CLIP: its weights, the layer it reads and any LoRA patched onto it."""
    patcher = getattr(clip, "patcher", None)
    patches = getattr(patcher, "patches", None) or {}
    extra = (
        f"layer={getattr(clip, 'layer_idx', None)};patches={getattr(patcher, 'patches_uuid', '') if patches else ''}"
    )
    return "clip:" + fingerprint_tensors(clip.cond_stage_model.state_dict().items(), extra=extra)


def conditioning_tensor(conditioning) -> Tensor:
    """The first entry of a CONDITIONING ([[cond [B, L, ctx], {...}], ...]) as [L, ctx]."""
    if not conditioning or not isinstance(conditioning[0][0], Tensor):
        raise ValueError("the conditioning input is empty: connect a CLIP Text Encode (or similar) output.")
    cond = conditioning[0][0]
    return cond[0] if cond.ndim == 3 else cond


def clip_text_encoder(clip):
    """caption -> context [L, ctx] through the user's CLIP, exactly as CLIPTextEncode encodes a prompt."""

    def encode(text: str) -> Tensor:
        return conditioning_tensor(clip.encode_from_tokens_scheduled(clip.tokenize(text)))

    return encode


def vae_image_encoder(vae):
    """[H, W, 3] in 0..1 -> Flux2 latent [128, H/16, W/16] through the user's VAE (as VAEEncode does)."""

    def encode(pixels: Tensor) -> Tensor:
        return vae.encode(pixels[None])[0]

    return encode


ENCODE_EVENT_INTERVAL_S = 0.1  # at most 10 encoding events a second (the last entry always), as the step events


def counter_progress(node_id: str | None = None):
    """on_progress(done, total) that drives the node's progress bar (and lets Cancel stop an encode pass) and tells
    the page: the node's text line 'encoding i/N' and `klein_lab.train.phase` events {phase: 'encoding', done,
    total, node} for the training panel of a Train node downstream (throttled to ENCODE_EVENT_INTERVAL_S)."""
    bar: list[comfy.utils.ProgressBar] = []
    last_sent = [-math.inf]

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total, node_id=node_id))
        bar[0].update_absolute(done, total)
        now = time.perf_counter()
        if now - last_sent[0] < ENCODE_EVENT_INTERVAL_S and done < total:
            return
        last_sent[0] = now
        broadcast(EVENT_PHASE, {"run": "", "node": node_id, "phase": "encoding", "done": done, "total": total})
        server = prompt_server()
        if server is not None and node_id is not None:
            server.send_progress_text(f"encoding {done}/{total}", node_id, server.client_id)

    return update
