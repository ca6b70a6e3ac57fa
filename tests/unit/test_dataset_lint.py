"""Dataset lint on a folder with planted problems: duplicates (also resized and re-encoded copies), missing and
empty captions, a caption without the trigger, a tiny image, a uniform-background image and an extreme aspect
ratio — each check lists exactly those files, the output is ordered and deterministic, pairs without partners
and a too-small album for the preset are reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from klein_lora_lab.trainer_core.album.dataset_lint import CHECK_ORDER, dhash, hamming, lint_album
from PIL import Image

SIDE = 512


def _pattern(seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """A distinct picture: smooth random blobs (structure for the hash) plus fine noise (a busy border)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    fine = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int32) + fine, 0, 255).astype(np.uint8))


def _save(folder: Path, name: str, img: Image.Image, caption: str | None = "a photo of TOK", **kw) -> None:
    img.save(folder / name, **kw)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


@pytest.fixture(scope="module")
def album(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("album")
    for i in range(6):
        _save(folder, f"{i:03d}.png", _pattern(i), f"a photo of TOK, view {i}")
    original = _pattern(0)
    _save(folder, "000_resized.png", original.resize((600, 600), Image.Resampling.LANCZOS), "TOK again")
    _save(folder, "000_recoded.jpg", original, "TOK once more", quality=60)
    _save(folder, "010.png", _pattern(10))
    _save(folder, "011.png", _pattern(11), None)  # missing caption
    _save(folder, "012.png", _pattern(12), "   \n")  # empty caption
    _save(folder, "013.png", _pattern(13), "a photo of a cat")  # no trigger
    _save(folder, "014.png", _pattern(14, (200, 200)))  # tiny
    backdrop = Image.new("RGB", (SIDE, SIDE), (245, 245, 245))
    backdrop.paste(_pattern(15, (200, 260)), (156, 126))
    _save(folder, "015.png", backdrop)  # uniform background
    _save(folder, "016.png", _pattern(16, (1536, 512)))  # 3:1
    return folder


def test_lint_lists_exactly_the_planted_files(album):
    """Each check names exactly the files planted for it, and nothing else is flagged as a warning."""
    report = lint_album(album, trigger="TOK", preset="character")
    assert report.images == 15
    assert [f.files for f in report.findings if f.code == "duplicates"] == [
        ("000.png", "000_recoded.jpg", "000_resized.png")
    ]
    assert report.files("missing_caption") == ["011.png"]
    assert report.files("empty_caption") == ["012.png"]
    assert report.files("no_trigger") == ["013.png"]
    assert report.files("small") == ["014.png (200×200)"]
    assert report.files("uniform_border") == ["015.png"]
    assert report.files("aspect") == ["016.png (1536×512)"]
    assert report.files("unreadable") == [] and report.files("pairs") == []
    codes = {f.code for f in report.warnings()}
    assert codes == {
        "duplicates",
        "missing_caption",
        "empty_caption",
        "no_trigger",
        "small",
        "uniform_border",
        "aspect",
        "too_few",
    }
    assert "15 images: the course uses 20–60 for character; add 5" in report.to_text()


def test_lint_is_deterministic_and_ordered(album):
    """Two runs give the same JSON; findings follow the documented check order; the JSON parses."""
    a, b = lint_album(album, preset="character"), lint_album(album, preset="character")
    assert a.to_json() == b.to_json()
    order = [CHECK_ORDER.index(f.code) for f in a.findings]
    assert order == sorted(order)
    data = json.loads(a.to_json())
    assert data["images"] == 15 and all(set(f) == {"code", "severity", "message", "files"} for f in data["findings"])


def test_dhash_survives_resize_and_recompression_but_separates_pictures(album):
    """The perceptual hash of a copy stays within a few bits; different pictures are far apart."""
    h = {name: dhash(Image.open(album / name).convert("RGB")) for name in ("000.png", "000_resized.png", "001.png")}
    assert hamming(h["000.png"], h["000_resized.png"]) <= 4
    assert hamming(h["000.png"], h["001.png"]) > 12


def test_pairs_and_album_size(tmp_path):
    """Image-to-image: files without a partner on either side are named; a big enough album for the preset
    gives no size warning; an unknown preset is refused with the valid names."""
    refs, targets = tmp_path / "control", tmp_path / "target"
    refs.mkdir()
    targets.mkdir()
    for i in range(3):
        _save(refs, f"{i:03d}.png", _pattern(100 + i), None)
        _save(targets, f"{i:03d}.png", _pattern(200 + i), "TOK render")
    _save(refs, "lonely_ref.png", _pattern(300), None)
    _save(targets, "lonely_target.png", _pattern(301), "TOK render")
    report = lint_album(targets, preset="image_to_image", pairs_folder=refs)
    assert report.files("pairs") == ["control/lonely_ref.png", "lonely_target.png"]
    assert report.files("missing_caption") == []  # references need no captions
    assert "too_few" in {f.code for f in report.findings}
    with pytest.raises(ValueError, match="style"):
        lint_album(targets, preset="portrait")


def test_clean_album_has_no_warnings(tmp_path):
    """A varied, captioned album of the right size for its preset gets no warnings at all."""
    for i in range(20):
        _save(tmp_path, f"{i:03d}.png", _pattern(400 + i), f"TOK, picture {i}")
    report = lint_album(tmp_path, preset="character")
    assert report.warnings() == []


def test_targets_missing_some_references_are_reported(tmp_path):
    """With several references per target (two folders, or files named _ref1/_ref2), a target that lacks one is
    reported under missing_reference with the reference it lacks; a target lacking all stays under pairs."""
    pose, garment, targets = tmp_path / "pose", tmp_path / "garment", tmp_path / "dressed"
    for folder in (pose, garment, targets):
        folder.mkdir()
    for i in range(3):
        _save(pose, f"{i:03d}.png", _pattern(500 + i), None)
        _save(targets, f"{i:03d}.png", _pattern(600 + i), "TOK outfit")
    _save(garment, "000.png", _pattern(700), None)
    _save(garment, "001.png", _pattern(701), None)
    _save(targets, "003.png", _pattern(603), "TOK outfit")
    report = lint_album(targets, preset="image_to_image", pairs_folder=[pose, garment])
    assert report.files("missing_reference") == ["002.png (lacks garment/002)"]
    assert report.files("pairs") == ["003.png"]
    (finding,) = [f for f in report.findings if f.code == "missing_reference"]
    assert "all 2 references (pose/<name>, garment/<name>)" in finding.message

    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for i in range(4):
        _save(numbered, f"{i:03d}_ref1.png", _pattern(800 + i), None)
        if i != 1:
            _save(numbered, f"{i:03d}_ref2.png", _pattern(900 + i), None)
    report = lint_album(targets, preset="image_to_image", pairs_folder=numbered)
    assert report.files("missing_reference") == ["001.png (lacks numbered/001_ref2)"]
    assert report.files("pairs") == []
