"""The latent/conditioning cache: content keys, atomic safetensors entries, hits and misses."""

from __future__ import annotations

from pathlib import Path

import torch
from klein_lora_lab.trainer_core.album.latent_cache import (
    WIDENED_KEY,
    LatentCache,
    content_key,
    fingerprint_tensors,
    image_key,
    text_key,
)
from safetensors import safe_open
from safetensors.torch import save_file


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


def _album(root: Path, pairs: bool = False) -> None:
    from PIL import Image

    for i, size in enumerate([(32, 32), (64, 32), (32, 32)]):
        target = root / "tgt" / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 100, 200)).save(target)
        target.with_suffix(".txt").write_text("a red thing" if i < 2 else "a blue thing")
        if pairs:
            ref = root / "ref" / f"{i:03d}.png"
            ref.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (0, 0, 40 * i)).save(ref)


class _FakeEncoders:
    """Deterministic stand-ins for a VAE (mean colour per latent cell) and a text encoder (hashed characters)."""

    def __init__(self) -> None:
        self.images = 0
        self.texts: list[str] = []

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += 1
        h, w = pixels.shape[0] // 16, pixels.shape[1] // 16
        cells = pixels.reshape(h, 16, w, 16, 3).mean(dim=(1, 3))  # [h, w, 3]
        return cells.permute(2, 0, 1).repeat(43, 1, 1)[:128]

    def text(self, caption: str) -> torch.Tensor:
        self.texts.append(caption)
        codes = torch.tensor([float(ord(c)) for c in caption] or [0.0])
        return codes[:, None].repeat(1, 16)


def test_encode_album_encodes_once_then_hits(tmp_path: Path):
    """First pass encodes each image and each distinct caption once; the second pass encodes nothing and gives
    identical tensors; items carry latents at their bucket size and the captions' contexts."""
    from klein_lora_lab.trainer_core.album.dataset import scan_folder
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album

    _album(tmp_path)
    ds = scan_folder(tmp_path / "tgt", resolution=32, trigger="TOK")
    enc = _FakeEncoders()
    prompts = ["a photo of TOK riding a bicycle"]
    first = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), prompts)
    assert enc.images == 3 and sorted(enc.texts) == sorted(["TOK, a red thing", "TOK, a blue thing", prompts[0], ""])
    assert (first.encoded, first.cached) == (7, 0)
    for item, ds_item in zip(first.items, ds.items, strict=True):
        w, h = ds_item.bucket
        assert item.latent.shape == (128, h // 16, w // 16) and item.refs == ()
    assert torch.equal(first.items[0].context, first.items[1].context)
    assert first.empty_context is not None and len(first.validation_contexts) == 1

    enc2 = _FakeEncoders()
    second = encode_album(ds, enc2.image, enc2.text, "vae", "te", LatentCache(tmp_path / "c"), prompts)
    assert enc2.images == 0 and enc2.texts == [] and (second.encoded, second.cached) == (0, 7)
    for a, b in zip(first.items, second.items, strict=True):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
    assert "0 encoded, 7 from cache" in second.report()

    enc3 = _FakeEncoders()
    third = encode_album(ds, enc3.image, enc3.text, "other-vae", "te", LatentCache(tmp_path / "c"), prompts)
    assert enc3.images == 3 and enc3.texts == [] and (third.encoded, third.cached) == (3, 4)


def test_encode_album_pairs_carry_reference_latents(tmp_path: Path):
    """Image-to-image items hold the encoded reference at the target's bucket size."""
    from klein_lora_lab.trainer_core.album.dataset import scan_pairs
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album

    _album(tmp_path, pairs=True)
    ds = scan_pairs(tmp_path / "ref", tmp_path / "tgt", resolution=32, trigger="TOK")
    enc = _FakeEncoders()
    out = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), with_empty_caption=False)
    assert enc.images == 6 and out.empty_context is None
    for item in out.items:
        assert len(item.refs) == 1 and item.refs[0].shape == item.latent.shape
        assert not torch.equal(item.refs[0], item.latent)


def test_two_references_round_trip_through_the_cache_in_order(tmp_path: Path):
    """Each target of a two-reference album carries both encoded references in folder order; a second pass
    reads every latent from the cache with identical tensors; and entries stored under the image keys of a
    single-reference album (as earlier versions wrote them) are read, not re-encoded."""
    from klein_lora_lab.trainer_core.album.dataset import file_hash, load_bucket_image, scan_pairs
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album
    from PIL import Image

    _album(tmp_path, pairs=True)
    second_ref = tmp_path / "ref2"
    second_ref.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (90, 40 * i, 0)).save(second_ref / f"{i:03d}.png")
    ds = scan_pairs([tmp_path / "ref", second_ref], tmp_path / "tgt", resolution=32, trigger="TOK")
    enc = _FakeEncoders()
    first = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), with_empty_caption=False)
    assert enc.images == 9 and (first.encoded, first.cached) == (11, 0)
    for item, ds_item in zip(first.items, ds.items, strict=True):
        assert len(item.refs) == 2 and all(r.shape == item.latent.shape for r in item.refs)
        for ref, path in zip(item.refs, ds_item.references, strict=True):
            assert torch.equal(ref, _FakeEncoders().image(load_bucket_image(path, ds_item.bucket)))
    assert not torch.equal(first.items[0].refs[0], first.items[0].refs[1])

    enc2 = _FakeEncoders()
    again = encode_album(ds, enc2.image, enc2.text, "vae", "te", LatentCache(tmp_path / "c"), with_empty_caption=False)
    assert enc2.images == 0 and (again.encoded, again.cached) == (0, 11)
    for a, b in zip(first.items, again.items, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.refs, b.refs, strict=True))

    single = scan_pairs(tmp_path / "ref", tmp_path / "tgt", resolution=32, trigger="TOK")
    old = LatentCache(tmp_path / "old")
    for item in single.items:
        for path in (item.reference, item.image):
            old.put(image_key(file_hash(path), "vae", item.bucket), {"latent": torch.full((128, 2, 2), 7.0)})
    enc3 = _FakeEncoders()
    loaded = encode_album(single, enc3.image, enc3.text, "vae", "te", old, with_empty_caption=False)
    assert enc3.images == 0 and all(torch.equal(i.refs[0], torch.full((128, 2, 2), 7.0)) for i in loaded.items)


def test_encode_album_adds_trigger_free_captions_only_when_asked(tmp_path: Path):
    """With preservation_class "" every caption is also encoded with its trigger removed (through the same
    cache) and each item carries that context; a class word takes the trigger's place; without it (None, the
    default) nothing more is encoded and items carry none."""
    from klein_lora_lab.trainer_core.album.dataset import scan_folder
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album

    _album(tmp_path)
    ds = scan_folder(tmp_path / "tgt", resolution=32, trigger="TOK")
    plain = encode_album(ds, _FakeEncoders().image, _FakeEncoders().text, "vae", "te", LatentCache(tmp_path / "c"))
    assert all(item.free_context is None for item in plain.items) and plain.free_captions == ()
    enc = _FakeEncoders()
    free = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), preservation_class="")
    assert sorted(enc.texts) == ["a blue thing", "a red thing"]  # the captions with the trigger came from the cache
    assert free.free_captions == ("a red thing", "a red thing", "a blue thing")
    assert torch.equal(free.items[2].free_context, enc.text("a blue thing"))
    assert torch.equal(free.items[2].context, plain.items[2].context)
    enc = _FakeEncoders()
    named = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), preservation_class="dog")
    assert named.free_captions == ("dog, a red thing", "dog, a red thing", "dog, a blue thing")


# ------------------------------------------------------------------------------- bf16 storage of float32 entries


def _bf16_valued(*shape: int, seed: int = 0) -> torch.Tensor:
    """float32 whose every value is a bf16 value, as ComfyUI's text encoder (bf16 on a GPU) hands it over."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).float()


def _stored_dtypes(path: Path) -> dict[str, str]:
    """Each tensor's dtype as the file holds it (safetensors' names: F32, BF16, BOOL)."""
    with safe_open(str(path), framework="pt") as entry:
        return {name: entry.get_slice(name).get_dtype() for name in entry.keys()}


def _float32_copy(new: LatentCache, old_root: Path) -> LatentCache:
    """The same entries written as the cache wrote them before bf16 storage: float32 tensors, the caller's
    metadata only (safetensors' own save_file, not LatentCache.put)."""
    for path in new.root.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as entry:
            meta = {k: v for k, v in (entry.metadata() or {}).items() if k != WIDENED_KEY}
        target = old_root / path.relative_to(new.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(new.get(path.stem), str(target), metadata=meta)
    return LatentCache(old_root)


def test_bf16_valued_float32_is_stored_in_half_the_bytes_and_reads_back_bit_identical(tmp_path: Path):
    """A float32 conditioning whose values are all bf16 values (the real encoder's output) is written as bf16
    (half the bytes of the same entry in float32) and get() gives back float32 with the very same bits; a bool
    mask beside it is stored as it is."""
    cache = LatentCache(tmp_path)
    context = _bf16_valued(512, 64)
    context[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    key = text_key("TOK, a cat", "te")
    cache.put(key, {"context": context, "mask": torch.ones(512, dtype=torch.bool)}, {"caption": "TOK, a cat"})
    assert _stored_dtypes(cache.path(key)) == {"context": "BF16", "mask": "BOOL"}

    reference = tmp_path / "float32.safetensors"
    save_file({"context": context, "mask": torch.ones(512, dtype=torch.bool)}, str(reference))
    context_bytes = context.numel() * 4
    assert reference.stat().st_size - cache.path(key).stat().st_size >= context_bytes // 2 - 256  # the marker
    assert cache.path(key).stat().st_size < 0.55 * reference.stat().st_size

    back = cache.get(key)
    assert back["context"].dtype == torch.float32 and back["mask"].dtype == torch.bool
    assert torch.equal(back["context"].view(torch.int32), context.view(torch.int32))  # bit for bit, -0.0 too


def test_float32_output_of_a_cpu_model_is_stored_unchanged(tmp_path: Path):
    """A tensor computed in float32 (a tiny Klein's prediction on the CPU) is not exact in bf16: it is stored
    as float32, with no bf16 marker, and reads back bit-identical; so is a bf16 tensor given as bf16."""
    from klein_lora_lab.trainer_core.model.klein import klein_forward
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein

    spec = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
    with torch.no_grad():
        out = klein_forward(tiny_klein(spec), torch.randn(1, 128, 2, 2), torch.tensor([0.5]), tiny_conditioning(spec))
    assert out.dtype == torch.float32 and not torch.equal(out.to(torch.bfloat16).float(), out)
    cache = LatentCache(tmp_path)
    key = content_key("image", "cpu")
    native = _bf16_valued(3, 16).to(torch.bfloat16)
    cache.put(key, {"latent": out[0], "native": native})
    assert _stored_dtypes(cache.path(key)) == {"latent": "F32", "native": "BF16"}
    with safe_open(str(cache.path(key)), framework="pt") as entry:
        assert WIDENED_KEY not in (entry.metadata() or {})
    back = cache.get(key)
    assert back["latent"].dtype == torch.float32 and torch.equal(back["latent"], out[0])
    assert back["native"].dtype == torch.bfloat16 and torch.equal(back["native"], native)  # not widened


def test_float32_entries_written_before_still_load_and_hit(tmp_path: Path):
    """A cache written before bf16 storage (float32 files, no marker) keeps its keys and loads as float32: an
    album encoded into it is read, not encoded again, with the same tensors as a fresh encode."""
    from klein_lora_lab.trainer_core.album.dataset import scan_folder
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album

    _album(tmp_path)
    ds = scan_folder(tmp_path / "tgt", resolution=32, trigger="TOK")
    fresh = encode_album(ds, _Bf16Encoders().image, _Bf16Encoders().text, "vae", "te", LatentCache(tmp_path / "c"))
    old = _float32_copy(LatentCache(tmp_path / "c"), tmp_path / "old")
    assert {d for p in old.root.rglob("*.safetensors") for d in _stored_dtypes(p).values()} == {"F32"}
    enc = _Bf16Encoders()
    loaded = encode_album(ds, enc.image, enc.text, "vae", "te", old)
    assert enc.images == 0 and enc.texts == [] and loaded.encoded == 0
    for a, b in zip(fresh.items, loaded.items, strict=True):
        assert b.latent.dtype == b.context.dtype == torch.float32
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
    corrupt = old.path(text_key("TOK, a red thing", "te"))
    save_file({"context": torch.zeros(2, 16)}, str(corrupt), metadata={WIDENED_KEY: '["context"]'})
    assert old.get(corrupt.stem) is None  # a marker that names a float32 tensor: damaged, a miss


class _Bf16Encoders(_FakeEncoders):
    """The fake encoders with outputs rounded to bf16 and widened back, as a bf16 GPU encoder hands them over;
    text features 16 wide (a tiny Klein's context width)."""

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        latent = super().image(pixels)
        return (latent + torch.linspace(-1, 1, latent.numel()).reshape(latent.shape)).to(torch.bfloat16).float()

    def text(self, caption: str) -> torch.Tensor:
        self.texts.append(caption)
        seed = sum((i + 1) * ord(c) for i, c in enumerate(caption))
        return _bf16_valued(max(1, len(caption) // 4), 16, seed=seed)


def test_training_from_a_bf16_cache_equals_training_from_the_float32_cache(tmp_path: Path):
    """The same album read from a cache written now (bf16 files) and from the float32 files the cache wrote
    before gives items of the same dtypes and values, and a tiny Klein trained on each (with preservation and
    caption dropout, so the trigger-free and empty captions are used too) logs bit-identical losses, also equal to
    the run on the freshly encoded tensors."""
    from klein_lora_lab.trainer_core.album.dataset import scan_folder
    from klein_lora_lab.trainer_core.album.latent_cache import encode_album
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import train

    _album(tmp_path)
    ds = scan_folder(tmp_path / "tgt", resolution=32, trigger="TOK")
    enc = _Bf16Encoders()
    fresh = encode_album(ds, enc.image, enc.text, "vae", "te", LatentCache(tmp_path / "c"), preservation_class="")
    stored = {d for p in (tmp_path / "c").rglob("*.safetensors") for d in _stored_dtypes(p).values()}
    assert stored == {"BF16"}  # every entry written now is bf16 on disk
    old = _float32_copy(LatentCache(tmp_path / "c"), tmp_path / "old")
    albums = {"fresh": fresh}
    for name, cache in (("bf16", LatentCache(tmp_path / "c")), ("float32", old)):
        again = _Bf16Encoders()
        albums[name] = encode_album(ds, again.image, again.text, "vae", "te", cache, preservation_class="")
        assert again.texts == [] and again.images == 0  # all read from the cache

    settings = TrainSettings(
        rank=4, alpha=4, learning_rate=1e-3, steps=4, checkpoint_every=0, save_dtype="fp32", batch_size=2,
        caption_dropout=0.3, preservation_weight=1.0, preservation_share=0.5,
    )  # fmt: skip
    spec = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
    losses = {}
    for name, album in albums.items():
        tensors = [t for item in album.items for t in (item.latent, item.context, item.free_context)]
        assert all(t.dtype == torch.float32 for t in [*tensors, album.empty_context])
        run = RunFolder.create(tmp_path / f"run-{name}", settings, {"trigger": "TOK"})
        train(tiny_klein(spec), list(album.items), settings, run, empty_context=album.empty_context)
        losses[name] = [(r["step"], r["loss"]) for r in run.read_metrics()]
    assert len(losses["fresh"]) == 4
    assert losses["bf16"] == losses["float32"] == losses["fresh"]
