"""A disk cache of encoded latents and text conditionings, keyed by content hash.

A key is the sha256 of everything the encoded result depends on: for an image, its file bytes, the encoder's
identity and the bucket size; for a caption, its text and the encoder's identity. The same album encoded with
the same encoders hits the cache whatever the files are called or wherever they live, and any change (a
retouched image, an edited caption, another VAE) is a miss. Entries are safetensors files written atomically
(temporary file + rename), so an interrupted run never leaves a half-written entry that later reads as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CACHE_VERSION = "1"  # bump when the meaning of a cached tensor changes


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
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            return None

    def put(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        """Write an entry atomically: a temporary file in the same folder, then os.replace."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(data, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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
