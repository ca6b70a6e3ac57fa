"""The latent/conditioning cache: content keys, atomic safetensors entries, hits and misses."""

from __future__ import annotations

from pathlib import Path

import torch
from klein_lora_lab.trainer_core.latent_cache import (
    LatentCache,
    content_key,
    fingerprint_tensors,
    image_key,
    text_key,
)


def test_keys_depend_on_every_part():
    """Image keys change with image bytes, encoder and bucket; text keys with caption and encoder."""
    base = image_key("aa" * 32, "vae-1", (512, 512))
    assert base == image_key("aa" * 32, "vae-1", (512, 512))
    assert (
        len(
            {
                base,
                image_key("bb" * 32, "vae-1", (512, 512)),
                image_key("aa" * 32, "vae-2", (512, 512)),
                image_key("aa" * 32, "vae-1", (512, 496)),
            }
        )
        == 4
    )
    assert text_key("TOK, a cat", "te") != text_key("TOK, a dog", "te") != text_key("TOK, a cat", "te2")
    assert content_key("k", "ab", "c") != content_key("k", "a", "bc")
    assert text_key("x", "e") != image_key("x", "e", (1, 1))


def test_round_trip_and_hit_counting(tmp_path: Path):
    """A stored entry reads back identical; get_or_compute computes once and then hits."""
    cache = LatentCache(tmp_path)
    key = text_key("TOK", "enc")
    calls = []

    def compute():
        calls.append(1)
        return {"context": torch.randn(7, 16), "mask": torch.ones(7, dtype=torch.bool)}

    first, hit1 = cache.get_or_compute(key, compute)
    second, hit2 = cache.get_or_compute(key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first["context"], second["context"]) and second["mask"].dtype == torch.bool
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert LatentCache(tmp_path).get(key) is not None  # another cache object on the same folder sees it


def test_damaged_entry_is_a_miss_and_gets_rewritten(tmp_path: Path):
    """A truncated entry file reads as a miss (never as data) and the next compute replaces it."""
    cache = LatentCache(tmp_path)
    key = content_key("image", "x")
    cache.put(key, {"latent": torch.zeros(128, 2, 2)})
    cache.path(key).write_bytes(b"\x00\x01garbage")
    assert cache.get(key) is None
    out, hit = cache.get_or_compute(key, lambda: {"latent": torch.ones(128, 2, 2)})
    assert not hit and torch.equal(cache.get(key)["latent"], out["latent"])


def test_writes_leave_no_temporary_files(tmp_path: Path):
    """After puts, the cache folder holds only finished .safetensors entries."""
    cache = LatentCache(tmp_path)
    for i in range(3):
        cache.put(content_key("t", str(i)), {"a": torch.full((2,), float(i))}, {"caption": f"c{i}"})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(p.suffix == ".safetensors" for p in files)


def test_fingerprint_separates_weights_and_shapes():
    """Encoder fingerprints differ for other values, other shapes, other names; equal weights agree."""
    a = {"w": torch.arange(1000.0).reshape(10, 100), "b": torch.zeros(3)}
    same = {k: v.clone() for k, v in a.items()}
    other_values = {"w": a["w"] + 1, "b": a["b"]}
    other_shape = {"w": a["w"].reshape(100, 10), "b": a["b"]}
    prints = [fingerprint_tensors(d.items()) for d in (a, same, other_values, other_shape)]
    assert prints[0] == prints[1]
    assert len({prints[0], prints[2], prints[3]}) == 3
    assert fingerprint_tensors(a.items(), extra="layer=-2") != prints[0]
