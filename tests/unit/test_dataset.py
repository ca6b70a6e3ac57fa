"""Album scanning: captions, trigger insertion, aspect buckets, image-to-image pairs and the summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from klein_lora_lab.trainer_core.album.dataset import (
    DatasetError,
    album_files_hash,
    bucket_sizes,
    choose_bucket,
    insert_trigger,
    load_bucket_image,
    reference_folder_lines,
    scan_folder,
    scan_pairs,
)
from PIL import Image


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30), caption: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def test_buckets_are_multiples_of_16_within_the_pixel_budget():
    """Every bucket is a multiple of 16 on both sides, never exceeds resolution², and spans both orientations."""
    for res in (32, 256, 512, 1024):
        sizes = bucket_sizes(res)
        assert (res, res) in sizes
        for w, h in sizes:
            assert w % 16 == 0 and h % 16 == 0
            assert w * h <= res * res
            assert (h, w) in sizes
            assert max(w / h, h / w) <= 4.0 + 1e-9


def test_bucket_choice_follows_the_aspect_ratio():
    """Square images get the square bucket, landscape a wide one, portrait a tall one, close to the true ratio."""
    sizes = bucket_sizes(512)
    assert choose_bucket(1000, 1000, sizes) == (512, 512)
    w, h = choose_bucket(1920, 1080, sizes)
    assert w > h and abs(w / h - 16 / 9) < 0.1
    w, h = choose_bucket(600, 900, sizes)
    assert h > w and abs(w / h - 2 / 3) < 0.05


def test_bad_resolution_names_the_value():
    """A resolution that is not a multiple of 16 is refused with the value in the message."""
    with pytest.raises(DatasetError, match="500"):
        bucket_sizes(500)


def test_trigger_insertion_modes():
    """The trigger is prepended/appended once, replaces [trigger], and is not doubled when already present."""
    assert insert_trigger("a red car", "TOK") == "TOK, a red car"
    assert insert_trigger("a red car", "TOK", "append") == "a red car, TOK"
    assert insert_trigger("a photo of [trigger] on a beach", "TOK") == "a photo of TOK on a beach"
    assert insert_trigger("TOK on a beach", "TOK") == "TOK on a beach"
    assert insert_trigger("TOKEN on a beach", "TOK") == "TOK, TOKEN on a beach"
    assert insert_trigger("a red car", "TOK", "none") == "a red car"
    assert insert_trigger("", "TOK") == "TOK"
    with pytest.raises(DatasetError, match="sideways"):
        insert_trigger("x", "TOK", "sideways")


def test_scan_folder_reads_captions_and_warns_about_missing_ones(tmp_path: Path):
    """Captions come from same-name .txt files; an image without one gets the trigger alone and a warning."""
    _image(tmp_path / "b.png", (64, 32), caption="a wide red thing")
    _image(tmp_path / "a.JPG", (32, 64), caption="a tall thing\n")
    _image(tmp_path / "c.webp", (48, 48))
    (tmp_path / "notes.md").write_text("not an image")
    ds = scan_folder(tmp_path, resolution=32, trigger="TOK")
    assert [i.image.name for i in ds.items] == ["a.JPG", "b.png", "c.webp"]
    assert ds.captions() == ["TOK, a tall thing", "TOK, a wide red thing", "TOK"]
    a, b, c = ds.items
    assert a.bucket[1] > a.bucket[0] and b.bucket[0] > b.bucket[1] and c.bucket == (32, 32)
    assert len(ds.warnings) == 1 and "c.webp" in ds.warnings[0] and "trigger alone" in ds.warnings[0]
    summary = ds.summary()
    assert "3 images" in summary and "c.webp" in summary and "trigger 'TOK' in 3 of 3" in summary


def test_default_caption_is_used_for_uncaptioned_images(tmp_path: Path):
    """A default caption replaces a missing .txt (with the trigger inserted) and the warning quotes it."""
    _image(tmp_path / "x.png", (32, 32))
    ds = scan_folder(tmp_path, resolution=32, trigger="TOKSTYLE", default_caption="a painting")
    assert ds.captions() == ["TOKSTYLE, a painting"]
    assert "'a painting'" in ds.warnings[0]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path):
    """A folder without images and a missing folder both raise an error naming the folder."""
    with pytest.raises(DatasetError, match="no images"):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_pairs_match_by_name_and_share_the_target_bucket(tmp_path: Path):
    """Pairs are matched by stem, take the target's caption and bucket, and keep file-name order."""
    for stem in ("001", "003"):
        _image(tmp_path / "pimpmyride_control" / f"{stem}.png", (64, 64), (10, 10, 10))
        _image(tmp_path / "pimpmyride" / f"{stem}.jpg", (64, 32), (250, 250, 0), caption="a sports car")
    ds = scan_pairs(tmp_path / "pimpmyride_control", tmp_path / "pimpmyride", resolution=32, trigger="pimpmyride")
    assert ds.kind == "pairs" and len(ds) == 2
    assert [(i.reference.name, i.image.name) for i in ds.items] == [("001.png", "001.jpg"), ("003.png", "003.jpg")]
    assert ds.captions() == ["pimpmyride, a sports car"] * 2
    ref = load_bucket_image(ds.items[0].reference, ds.items[0].bucket)
    tgt = load_bucket_image(ds.items[0].image, ds.items[0].bucket)
    assert ref.shape == tgt.shape == (ds.items[0].bucket[1], ds.items[0].bucket[0], 3)


def test_unmatched_pairs_are_all_listed_in_one_error(tmp_path: Path):
    """Every unmatched file on either side appears in the single error message."""
    for stem in ("001", "002", "005"):
        _image(tmp_path / "refs" / f"{stem}.png", (32, 32))
    for stem in ("001", "003", "004"):
        _image(tmp_path / "tgts" / f"{stem}.png", (32, 32))
    with pytest.raises(DatasetError) as err:
        scan_pairs(tmp_path / "refs", tmp_path / "tgts", resolution=32)
    msg = str(err.value)
    for name in ("002.png", "005.png", "003.png", "004.png"):
        assert name in msg
    assert "targets without a reference (2)" in msg and "references without a target (2)" in msg


def test_bucket_image_is_cropped_not_stretched(tmp_path: Path):
    """A 2:1 image put in a square bucket keeps its centre (cropped) rather than squashing the sides in."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (16, 0, 48, 32))  # red centre square, blue sides
    img.save(tmp_path / "w.png")
    out = load_bucket_image(tmp_path / "w.png", (32, 32))
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 0.95 and out[..., 2].mean() < 0.05


def test_album_files_hash_follows_content(tmp_path: Path):
    """The dataset hash changes when an image or a caption changes and not when nothing does."""
    _image(tmp_path / "a.png", (32, 32), caption="one")
    h1 = album_files_hash(scan_folder(tmp_path, resolution=32))
    assert h1 == album_files_hash(scan_folder(tmp_path, resolution=32))
    (tmp_path / "a.txt").write_text("two")
    h2 = album_files_hash(scan_folder(tmp_path, resolution=32))
    _image(tmp_path / "a.png", (32, 32), colour=(1, 2, 3))
    h3 = album_files_hash(scan_folder(tmp_path, resolution=32))
    assert len({h1, h2, h3}) == 3


def test_files_named_ref1_ref2_give_each_target_its_references_in_number_order(tmp_path: Path):
    """In one reference folder, 001_ref1.png and 001_ref2.png are target 001's references 1 and 2 (number order,
    not listing order: _ref10 comes after _ref2); the summary says how many references each target takes."""
    for stem in ("001", "002"):
        for n in (10, 2, 1):
            _image(tmp_path / "refs" / f"{stem}_ref{n}.png", (32, 32), (n, 0, 0))
        _image(tmp_path / "tgts" / f"{stem}.png", (32, 32), caption="a car")
    ds = scan_pairs(tmp_path / "refs", tmp_path / "tgts", resolution=32, trigger="TOK")
    assert [[p.name for p in item.references] for item in ds.items] == [
        ["001_ref1.png", "001_ref2.png", "001_ref10.png"],
        ["002_ref1.png", "002_ref2.png", "002_ref10.png"],
    ]
    assert ds.items[0].reference == tmp_path / "refs" / "001_ref1.png"
    assert ds.reference_labels == ("refs/<name>_ref1", "refs/<name>_ref2", "refs/<name>_ref10")
    assert "2 pairs (3 references → target)" in ds.summary()
    assert "1 = refs/<name>_ref1, 2 = refs/<name>_ref2" in ds.summary()


def test_several_reference_folders_give_references_in_folder_order(tmp_path: Path):
    """Several reference folders: each gives one reference per target, in the order the folders are listed (the
    reference-latent order); the album hash follows that order. A target named like a numbered reference
    ('004_ref1') still takes its own same-name file."""
    for stem in ("001", "004_ref1"):
        _image(tmp_path / "pose" / f"{stem}.png", (32, 32), (10, 10, 10))
        _image(tmp_path / "garment" / f"{stem}.jpg", (32, 32), (20, 20, 20))
        _image(tmp_path / "dressed" / f"{stem}.png", (64, 32), caption="a person")
    ds = scan_pairs([tmp_path / "pose", tmp_path / "garment"], tmp_path / "dressed", resolution=32)
    assert [[p.parent.name + "/" + p.name for p in i.references] for i in ds.items] == [
        ["pose/001.png", "garment/001.jpg"],
        ["pose/004_ref1.png", "garment/004_ref1.jpg"],
    ]
    assert ds.reference_labels == ("pose/<name>", "garment/<name>")
    swapped = scan_pairs([tmp_path / "garment", tmp_path / "pose"], tmp_path / "dressed", resolution=32)
    assert [p.parent.name for p in swapped.items[0].references] == ["garment", "pose"]
    assert album_files_hash(ds) != album_files_hash(swapped)
    with pytest.raises(DatasetError, match="two reference folders are the same"):
        scan_pairs([tmp_path / "pose", tmp_path / "pose"], tmp_path / "dressed", resolution=32)
    with pytest.raises(DatasetError, match="reference and target folder are the same"):
        scan_pairs([tmp_path / "pose", tmp_path / "dressed"], tmp_path / "dressed", resolution=32)


def test_targets_with_missing_references_are_all_listed_in_one_error(tmp_path: Path):
    """Every target needs all the album's references: one error names the target lacking one (and which), the
    target lacking all, and the reference whose target does not exist."""
    for stem in ("001", "002"):
        _image(tmp_path / "refs" / f"{stem}_ref1.png", (32, 32))
    _image(tmp_path / "refs" / "001_ref2.png", (32, 32))
    _image(tmp_path / "refs" / "009_ref1.png", (32, 32))
    for stem in ("001", "002", "003"):
        _image(tmp_path / "tgts" / f"{stem}.png", (32, 32))
    with pytest.raises(DatasetError) as err:
        scan_pairs(tmp_path / "refs", tmp_path / "tgts", resolution=32)
    msg = str(err.value)
    assert "targets with missing references (1): 002.png lacks refs/002_ref2" in msg
    assert "targets without a reference (1): 003.png" in msg
    assert "references without a target (1): 009_ref1.png" in msg


def test_reference_folder_lines_skip_blank_lines():
    """The multi-line widget gives one folder per non-blank line, spaces around a line dropped."""
    assert reference_folder_lines(" pose \n\n garment\n") == ["pose", "garment"]
    assert reference_folder_lines("") == []


def test_trigger_free_caption_removes_or_replaces_the_trigger() -> None:
    """Preservation's captions: the whole-word trigger goes with the comma that set it apart, wherever it stood;
    a class word takes its place instead; other words containing it are left alone."""
    from klein_lora_lab.trainer_core.album.dataset import trigger_free_caption

    assert trigger_free_caption("TOK, a woman on a beach", "TOK") == "a woman on a beach"
    assert trigger_free_caption("a woman on a beach, TOK", "TOK") == "a woman on a beach"
    assert trigger_free_caption("a photo of TOK, smiling", "TOK") == "a photo of, smiling"
    assert trigger_free_caption("a, TOK, b", "TOK") == "a, b"
    assert trigger_free_caption("TOK", "TOK") == ""
    assert trigger_free_caption("TOKEN TOK", "TOK") == "TOKEN"
    assert trigger_free_caption("TOK, a woman", "TOK", "woman") == "woman, a woman"
    assert trigger_free_caption("a photo", "") == "a photo"
