"""The large-album benchmark's generated album: the aspect mix lands in distinct buckets, pictures and captions
are the same on every run (so two runs measure the same album)."""

from __future__ import annotations

import numpy as np
from harness.benchmarks import load_benchmark


def test_default_aspects_fill_distinct_buckets_at_1024():
    """Each default aspect ratio, at the image size the benchmark writes, falls in its own bucket of the pack's
    1024 list, so a 200-image album has as many buckets as aspects, with images spread evenly."""
    from klein_lora_lab.trainer_core.album.dataset import bucket_sizes, choose_bucket

    bench = load_benchmark("album_bench")
    aspects = bench.parse_aspects(bench.DEFAULT_ASPECTS)
    sizes = bucket_sizes(1024)
    buckets = [choose_bucket(*bench.image_size(aspect, 1024), sizes) for aspect in aspects]
    assert len(set(buckets)) == len(aspects) == 5
    for (aw, ah), (w, h) in zip(aspects, buckets, strict=True):
        assert abs(np.log(w / h) - np.log(aw / ah)) < 0.05  # the bucket keeps the picture's shape
        assert 0.9 * 1024**2 <= w * h <= 1024**2


def test_album_pictures_and_captions_are_deterministic():
    """The same index and seed give the same pixels and caption; another seed or index gives others."""
    bench = load_benchmark("album_bench")
    first = np.asarray(bench.album_image(3, (48, 32), seed=0))
    assert first.shape == (32, 48, 3)
    assert np.array_equal(first, np.asarray(bench.album_image(3, (48, 32), seed=0)))
    assert not np.array_equal(first, np.asarray(bench.album_image(3, (48, 32), seed=1)))
    assert not np.array_equal(first, np.asarray(bench.album_image(4, (48, 32), seed=0)))
    assert bench.album_caption(3, 0) == bench.album_caption(3, 0)
    assert len({bench.album_caption(i, 0) for i in range(20)}) > 10
