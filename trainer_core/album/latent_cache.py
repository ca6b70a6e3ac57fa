"""A disk cache of encoded latents and text conditionings, keyed by content hash.

A key is the sha256 of everything the encoded result depends on: for an image, its file bytes, the encoder's
identity and the bucket size; for a caption, its text and the encoder's identity. The same album encoded with
the same encoders hits the cache whatever the files are called or wherever they live, and any change (a
retouched image, an edited caption, another VAE) is a miss. Entries are safetensors files written atomically
(files/atomic.py: temporary file, fsync, rename), so an interrupted run never leaves a half-written entry
that later reads as valid, and a full disk gives the pack's disk-full message.

A float32 tensor whose every value is a bf16 value (a VAE's latents on a GPU, see `_bf16_exact`) is stored
as bf16 and read back as the float32 it was, bit for bit: half the bytes, nothing lost. Other tensors, and
entries written before, are stored and read as they are.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from ..files.atomic import atomic_write_bytes
from ..files.safe_paths import confined_file
from ..training.data import TrainItem
from .dataset import Dataset, album_files_hash, file_hash, load_bucket_image, trigger_free_caption

CACHE_VERSION = "1"  # bump when the meaning of a cached tensor changes
# Metadata key of an entry: the names (a JSON list) of its float32 tensors that the file holds as bf16. A reader
# widens exactly these back to float32; an entry without the key (written before) is read as it is stored.
WIDENED_KEY = "klein_lab.float32_stored_as_bf16"


def content_key(kind: str, *parts: str | bytes) -> str:
    """sha256 over a kind tag and length-prefixed parts (so ('ab','c') and ('a','bc') never collide)."""
    digest = hashlib.sha256(f"klein-lab-cache/{CACHE_VERSION}/{kind}".encode())
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def image_key(image_sha256: str, encoder_id: str, bucket: tuple[int, int]) -> str:
    """Key of an image latent: image bytes (as their sha256) + encoder identity + bucket (width, height)."""
    return content_key("image", image_sha256, encoder_id, f"{bucket[0]}x{bucket[1]}")


def text_key(caption: str, encoder_id: str) -> str:
    """Key of a caption's conditioning: caption text + encoder identity."""
    return content_key("text", caption, encoder_id)


def fingerprint_tensors(named: Iterable[tuple[str, Tensor]], extra: str = "") -> str:
    """A cheap identity of an encoder's weights: every name, shape and dtype, plus a strided sample of values.

    Hashing all weights of a 4B text encoder would take longer than encoding a small album; names and shapes
    tell architectures apart and the sampled values tell two checkpoints of one architecture apart.
    """
    digest = hashlib.sha256(extra.encode("utf-8"))
    for name, tensor in named:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        stride = max(1, flat.numel() // 64)
        sample = flat[::stride][:64].to(device="cpu", dtype=torch.float32)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _bf16_exact(tensor: Tensor) -> bool:
    """Whether a float32 tensor round-trips through bf16 bit for bit (every value is a widened bf16 value).

    Where it holds: on a GPU ComfyUI runs the Flux2 VAE in bf16 and widens its latents to float32 for the caller,
    so the low 16 bits of each float32 are zero and float32 on disk doubles the bytes for nothing (measured on an
    H200: 1.0 MiB per 1024² latent instead of 2.0). Klein's text conditionings are not such tensors: ComfyUI runs
    the Qwen3 encoder's residual stream in float32, so they are kept as float32 (15.0 MiB per 512 tokens), as is
    anything computed in float32 on the CPU. The check is per tensor and bitwise (NaN payloads, the sign of
    zero), so storing never changes a value."""
    if tensor.dtype != torch.float32:
        return False
    widened = tensor.to(torch.bfloat16).to(torch.float32)
    return torch.equal(widened.view(torch.int32), tensor.view(torch.int32))


@dataclass
class CacheStats:
    """How many entries a pass found in the cache and how many it had to encode."""

    hits: int = 0
    misses: int = 0

    @property
    def total(self) -> int:
        return self.hits + self.misses


class LatentCache:
    """Content-addressed safetensors entries under `root/<key[:2]>/<key>.safetensors`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key {key!r}: expected a hex digest from content_key().")
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The cached tensors, or None when the entry is absent or unreadable (a damaged entry is a miss)."""
        path = self.path(key)
        if not path.is_file():
            return None
        confined_file(path, [self.root], "encode cache entry")  # a link planted in the cache is never read
        try:
            with safe_open(str(path), framework="pt") as entry:
                widened = json.loads((entry.metadata() or {}).get(WIDENED_KEY, "[]"))
                tensors = {name: entry.get_tensor(name) for name in entry.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError):
            return None
        if not isinstance(widened, list) or not all(
            name in tensors and tensors[name].dtype == torch.bfloat16 for name in widened
        ):
            return None  # metadata that does not match its tensors: damaged, a miss like a truncated file
        for name in widened:
            tensors[name] = tensors[name].to(torch.float32)  # exactly the float32 the encoder gave (put)
        return tensors

    def put(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        """Write an entry with the pack's atomic writer (fsynced, renamed into place; a full disk raises
        DiskFullError naming the entry and the fix, and leaves no partial file). Float32 tensors that are exact
        in bf16 are stored as bf16 and named in the entry's metadata (WIDENED_KEY); get() widens them back."""
        path = self.path(key)
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        if WIDENED_KEY in meta:
            raise ValueError(
                f"cache metadata key {WIDENED_KEY!r} is the cache's own: name the entry's fields otherwise."
            )
        data: dict[str, Tensor] = {}
        widened: list[str] = []
        for name, tensor in tensors.items():
            t = tensor.detach().to("cpu").contiguous()
            if _bf16_exact(t):
                t = t.to(torch.bfloat16)
                widened.append(name)
            data[name] = t
        if widened:
            meta[WIDENED_KEY] = json.dumps(widened)
        atomic_write_bytes(path, save(data, metadata=meta))
        return path

    def get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, Tensor]], metadata: Mapping[str, str] | None = None
    ) -> tuple[dict[str, Tensor], bool]:
        """(tensors, hit). On a miss `compute()` runs and its result is stored before it is returned."""
        cached = self.get(key)
        if cached is not None:
            self.stats.hits += 1
            return cached, True
        self.stats.misses += 1
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in compute().items()}
        self.put(key, tensors, metadata)
        return tensors, False

    def describe(self) -> str:
        return json.dumps({"root": str(self.root), "hits": self.stats.hits, "misses": self.stats.misses})


# ------------------------------------------------------------------------------------------------ albums


@dataclass(frozen=True)
class EncodedDataset:
    """An album ready to train on: items (latent, context, refs), the empty-caption context (caption dropout),
    validation prompts and their contexts, and how the encode pass went. free_captions: each item's caption
    without its trigger (preservation; the items carry their contexts), empty when they were not encoded."""

    items: tuple[TrainItem, ...]
    captions: tuple[str, ...]
    empty_context: Tensor | None
    validation_prompts: tuple[str, ...]
    validation_contexts: tuple[Tensor, ...]
    dataset_hash: str
    trigger: str
    kind: str
    encoded: int  # entries computed by the encoders in this pass
    cached: int  # entries read from the cache
    seconds: float
    free_captions: tuple[str, ...] = ()

    def report(self) -> str:
        total = self.encoded + self.cached
        return (
            f"{len(self.items)} {'pairs' if self.kind == 'pairs' else 'images'}: {total} latents/conditionings, "
            f"{self.encoded} encoded, {self.cached} from cache, {self.seconds:.2f} s"
        )


ImageEncoder = Callable[[Tensor], Tensor]  # [H, W, 3] in 0..1 -> latent [128, H/16, W/16]
TextEncoder = Callable[[str], Tensor]  # caption -> context [L, ctx]


def encode_album(
    dataset: Dataset,
    encode_image: ImageEncoder,
    encode_text: TextEncoder,
    image_encoder_id: str,
    text_encoder_id: str,
    cache: LatentCache,
    validation_prompts: Iterable[str] = (),
    with_empty_caption: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    preservation_class: str | None = None,
) -> EncodedDataset:
    """Encode every image (and each of its references) and every distinct caption once, through the cache.

    Captions shared by several images are encoded once; the empty caption (caption dropout) and the validation
    prompts go through the same cache. `on_progress(done, total)` is called after each entry.
    preservation_class: None encodes no trigger-free captions; "" each caption with its trigger removed; a word
    (e.g. "woman") each caption with that word in the trigger's place (trigger_free_caption).
    """
    start = time.perf_counter()
    hits0, misses0 = cache.stats.hits, cache.stats.misses
    prompts = tuple(p for p in validation_prompts if p.strip())
    free = (
        ()
        if preservation_class is None
        else tuple(trigger_free_caption(item.caption, dataset.trigger, preservation_class) for item in dataset.items)
    )
    extra = [*prompts, *([""] if with_empty_caption else []), *free]
    texts = list(dict.fromkeys([*dataset.captions(), *extra]))
    # One latent per (file, bucket): a reference is encoded at its target's bucket (the same file used by two
    # targets of different buckets is encoded at both).
    images = list(dict.fromkeys((p, item.bucket) for item in dataset.items for p in (*item.references, item.image)))
    total, done = len(texts) + len(images), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    contexts: dict[str, Tensor] = {}
    for text in texts:
        entry, _ = cache.get_or_compute(
            text_key(text, text_encoder_id), lambda text=text: {"context": encode_text(text)}, {"caption": text}
        )
        contexts[text] = entry["context"]
        tick()

    latents: dict[tuple[Path, tuple[int, int]], Tensor] = {}
    for path, bucket in images:
        key = image_key(file_hash(path), image_encoder_id, bucket)
        entry, _ = cache.get_or_compute(
            key,
            lambda path=path, bucket=bucket: {"latent": encode_image(load_bucket_image(path, bucket))},
            {"file": path.name, "bucket": f"{bucket[0]}x{bucket[1]}"},
        )
        latents[(path, bucket)] = entry["latent"]
        tick()

    items = tuple(
        TrainItem(
            latent=latents[(item.image, item.bucket)],
            context=contexts[item.caption],
            refs=tuple(latents[(ref, item.bucket)] for ref in item.references),  # reference 1, 2, … in order
            name=item.image.name,
            free_context=contexts[free[k]] if free else None,
        )
        for k, item in enumerate(dataset.items)
    )
    return EncodedDataset(
        items=items,
        captions=tuple(dataset.captions()),
        empty_context=contexts[""] if with_empty_caption else None,
        validation_prompts=prompts,
        validation_contexts=tuple(contexts[p] for p in prompts),
        dataset_hash=album_files_hash(dataset),
        trigger=dataset.trigger,
        kind=dataset.kind,
        encoded=cache.stats.misses - misses0,
        cached=cache.stats.hits - hits0,
        seconds=time.perf_counter() - start,
        free_captions=free,
    )
