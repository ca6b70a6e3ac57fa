"""Encode a dataset once: captions through the user's CLIP, images through the user's VAE, into a disk cache.

A second run on the same album with the same encoders reads everything from the cache, so the text encoder and
VAE can leave the GPU during training (the train node unloads them).
"""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.dataset import Dataset, insert_trigger
from ...trainer_core.album.latent_cache import LatentCache, encode_album, fingerprint_tensors
from ..comfy.encoders import (
    clip_identity,
    clip_text_encoder,
    conditioning_tensor,
    counter_progress,
    vae_identity,
    vae_image_encoder,
)
from ..comfy.paths import cache_dir
from ..comfy.sockets import DATASET, ENCODED_DATASET

# One prompt per clinic group (trainer_core/analysis/live_clinic.py): album-like, the bicycle test, no trigger.
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of [trigger]\na photo of [trigger] riding a bicycle\na photo of a bicycle leaning against a brick wall"
)


def parse_validation_prompts(text: str, trigger: str) -> list[str]:
    """One prompt per non-empty line, '[trigger]' replaced by the dataset's trigger word."""
    return [insert_trigger(line, trigger, "none") for line in text.splitlines() if line.strip()]


class KleinLabEncodeDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabEncodeDataset",
            display_name="Klein Encode Dataset (cached)",
            category="Klein LoRA Lab/train",
            description=(
                "Encodes every caption with the CLIP (Klein's Qwen3 text encoder) and every image with the VAE, once, "
                "into a cache keyed by content. A second run on the same album encodes nothing."
            ),
            inputs=[
                DATASET.Input("dataset", tooltip="From 'Klein Dataset (Folder)' or 'Klein Dataset (Image Pairs)'."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE ('Load VAE', flux2-vae.safetensors)."),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Klein's text encoder (Load CLIP, type flux2). Encodes each caption once.",
                ),
                io.String.Input(
                    "validation_prompts",
                    default=DEFAULT_VALIDATION_PROMPTS,
                    multiline=True,
                    tooltip=(
                        "Prompts sampled during training at a fixed seed, one per line; [trigger] becomes the "
                        "trigger word. The live clinic reads each by its words: the trigger alone ('a photo of "
                        "[trigger]') shows the concept, the trigger in a scene the album never showed is the bicycle "
                        "test, a prompt without the trigger shows leaking."
                    ),
                ),
                io.Conditioning.Input(
                    "conditioning",
                    optional=True,
                    tooltip=(
                        "Advanced: one conditioning used for every caption and validation prompt instead of the "
                        "CLIP (single-caption albums, tests). Leave empty to encode the captions with the CLIP."
                    ),
                ),
                io.String.Input(
                    "preservation_class",
                    default="",
                    optional=True,
                    tooltip=(
                        "For preservation (Training Options): each caption is also encoded without the trigger, so "
                        "training can keep those prompts where the base model puts them. Empty: the trigger word is "
                        "removed; a class word (e.g. 'woman', 'dog', 'painting') takes its place instead."
                    ),
                ),
            ],
            outputs=[ENCODED_DATASET.Output(display_name="encoded_dataset"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],  # the node's id: its encoding progress goes to the page with it
        )

    @classmethod
    def execute(
        cls, dataset: Dataset, vae, validation_prompts: str, clip=None, conditioning=None, preservation_class: str = ""
    ) -> io.NodeOutput:
        prompts = parse_validation_prompts(validation_prompts, dataset.trigger)
        if conditioning is not None:
            fixed = conditioning_tensor(conditioning)
            encode_text, text_id = (lambda _text: fixed), "fixed:" + fingerprint_tensors([("cond", fixed)])
        elif clip is not None:
            encode_text, text_id = clip_text_encoder(clip), clip_identity(clip)
        else:
            raise ValueError("Klein Encode Dataset needs a text encoder: connect 'clip' (Load CLIP, type flux2).")
        encoded = encode_album(
            dataset,
            vae_image_encoder(vae),
            encode_text,
            vae_identity(vae),
            text_id,
            LatentCache(cache_dir()),
            validation_prompts=prompts,
            # A fixed conditioning has no empty-caption counterpart, so caption dropout needs the CLIP.
            with_empty_caption=conditioning is None,
            on_progress=counter_progress(cls.hidden.unique_id if cls.hidden else None),  # None: called outside a prompt
            # A fixed conditioning is the same with or without the trigger: nothing to preserve against.
            preservation_class=None if conditioning is not None else preservation_class,
        )
        report = encoded.report()
        return io.NodeOutput(encoded, report, ui={"text": [report]})


NODES = [KleinLabEncodeDataset]
