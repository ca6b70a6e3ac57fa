"""Dataset lint: what to fix in an album before training, each finding with the files it concerns.

Checks (in this order, files sorted by name inside each finding, so the output is deterministic):
  unreadable        files that do not open as images
  duplicates        near-duplicate groups: 64-bit dHash within DUPLICATE_BITS bits and 16×16 colour thumbnails
                    within DUPLICATE_COLOUR (resized and re-encoded copies are caught; flat images of different
                    colours are not confused)
  small             short side below MIN_SHORT_SIDE px (upscaled when bucketed: soft results)
  aspect            aspect ratio beyond MAX_ASPECT_RATIO (a bucket crops or squeezes much of the picture)
  crop              (note) bucketing crops more than CROP_NOTE of the picture (sizes are fine otherwise:
                    every image is resized to a bucket whose sides are multiples of 16)
  missing_caption   no same-name .txt
  empty_caption     a .txt that holds only whitespace
  no_trigger        a caption that does not contain the trigger word (nor '[trigger]')
  uniform_border    the picture's border is nearly one flat colour (std of border pixels < UNIFORM_BORDER_STD):
                    the LoRA may learn the backdrop along with the concept
  pairs             (image-to-image) files without a same-name partner
  missing_reference (image-to-image, several references) targets that lack some of the album's references
  too_few / many    album size against the course's table for the chosen preset (DESIGN.md §6)

Pure PIL + numpy, no ComfyUI; reuses dataset.py's folder listing, caption and image loading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .dataset import (
    TRIGGER_PLACEHOLDER,
    bucket_sizes,
    choose_bucket,
    image_size,
    list_images,
    load_image,
    match_references,
)

MIN_SHORT_SIDE = 512
MAX_ASPECT_RATIO = 2.5
CROP_NOTE = 0.10
DUPLICATE_BITS = 6  # of 64 dHash bits
DUPLICATE_COLOUR = 0.08  # mean absolute difference of 16×16 RGB thumbnails (0..1)
UNIFORM_BORDER_STD = 0.03  # std of the border pixels (grayscale 0..1) below which the backdrop is flat
BORDER_SHARE = 0.08  # the border is this share of each side of a 64×64 thumbnail

# The course's album sizes per preset (DESIGN.md §6): (minimum, maximum) images, or pairs for image_to_image.
PRESET_ALBUM_SIZES: dict[str, tuple[int, int]] = {
    "style": (50, 200),
    "character": (20, 60),
    "object": (30, 100),
    "image_to_image": (30, 100),
}

CHECK_ORDER = (
    "unreadable",
    "duplicates",
    "small",
    "aspect",
    "crop",
    "missing_caption",
    "empty_caption",
    "no_trigger",
    "uniform_border",
    "pairs",
    "missing_reference",
    "too_few",
    "many",
)


@dataclass(frozen=True)
class LintFinding:
    """One finding: a check code, 'warning' or 'note', a sentence with the fix, and the files concerned
    (for duplicates: one finding per group)."""

    code: str
    severity: str
    message: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class LintReport:
    folder: str
    images: int
    findings: tuple[LintFinding, ...]

    def warnings(self) -> list[LintFinding]:
        return [f for f in self.findings if f.severity == "warning"]

    def files(self, code: str) -> list[str]:
        """Every file named by findings of `code` (sorted, without repeats)."""
        return sorted({name for f in self.findings if f.code == code for name in f.files})

    def to_json(self) -> str:
        data = {"folder": self.folder, "images": self.images, "findings": [asdict(f) for f in self.findings]}
        return json.dumps(data, indent=2)

    def to_text(self) -> str:
        n_warn = len(self.warnings())
        lines = [f"{self.images} images in '{self.folder}': {n_warn} warning(s), {len(self.findings) - n_warn} note(s)"]
        if not self.findings:
            lines.append("no findings: the album looks ready to train.")
        for f in self.findings:
            shown = ", ".join(f.files[:12]) + (f" and {len(f.files) - 12} more" if len(f.files) > 12 else "")
            lines.append(f"{f.severity}: {f.message}" + (f" [{shown}]" if shown else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- hashes


def dhash(img: Image.Image, size: int = 8) -> int:
    """Difference hash: grayscale (size+1)×size thumbnail, one bit per horizontal neighbour pair (left > right).
    Survives resizing, recompression and small colour shifts; 64 bits for size 8."""
    small = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, :-1] > small[:, 1:]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def colour_thumb(img: Image.Image, size: int = 16) -> np.ndarray:
    """[size, size, 3] float in 0..1: the picture's colours and layout."""
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def border_std(img: Image.Image, size: int = 64) -> float:
    """Standard deviation of the grayscale border pixels (outer BORDER_SHARE of each side of a size² thumb)."""
    g = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    k = max(1, round(size * BORDER_SHARE))
    border = np.concatenate([g[:k].ravel(), g[-k:].ravel(), g[k:-k, :k].ravel(), g[k:-k, -k:].ravel()])
    return float(border.std())


@dataclass(frozen=True)
class _Probe:
    name: str
    size: tuple[int, int]
    hash: int
    thumb: np.ndarray
    border: float


def _probe(path: Path) -> _Probe:
    img = load_image(path)
    return _Probe(path.name, image_size(path), dhash(img), colour_thumb(img), border_std(img))


def duplicate_groups(probes: Sequence[_Probe]) -> list[list[str]]:
    """Groups (each sorted, groups by first name) of near-duplicate images (union of matching pairs)."""
    parent = list(range(len(probes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(probes)):
        for j in range(i + 1, len(probes)):
            a, b = probes[i], probes[j]
            if (
                hamming(a.hash, b.hash) <= DUPLICATE_BITS
                and float(np.abs(a.thumb - b.thumb).mean()) <= DUPLICATE_COLOUR
            ):
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, p in enumerate(probes):
        groups.setdefault(root(i), []).append(p.name)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


# ---------------------------------------------------------------------------------------------- the lint


def _has_trigger(caption: str, trigger: str) -> bool:
    return TRIGGER_PLACEHOLDER in caption or bool(re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption))


def _caption_state(image: Path) -> str | None:
    """'missing', 'empty' or the caption text."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    return txt.read_text(encoding="utf-8-sig", errors="replace").strip()


def lint_album(
    folder: Path | str,
    trigger: str = "TOK",
    preset: str = "style",
    pairs_folder: Path | str | Sequence[Path | str] | None = None,
    resolution: int = 512,
    *,
    roots: Sequence[Path | str] | None = None,
) -> LintReport:
    """Lint an album folder (and, for image-to-image, the folder or folders of its reference images).

    `folder` holds the training images (the targets of pairs) with their captions; `pairs_folder` the
    references matched by file stem (a list: several references per target, see dataset.match_references).
    `preset` picks the album-size range; `resolution` the buckets.
    """
    if preset not in PRESET_ALBUM_SIZES:
        raise ValueError(f"preset={preset!r} does not exist: use one of {sorted(PRESET_ALBUM_SIZES)}.")
    root = Path(folder).expanduser()
    images = list_images(root, roots)  # refuses files linked from outside the allowed folders
    if pairs_folder is None or isinstance(pairs_folder, (str, Path)):
        pair_folders = [pairs_folder] if pairs_folder else []
    else:
        pair_folders = list(pairs_folder)
    ref_lists = [list_images(Path(f).expanduser(), roots) for f in pair_folders]
    refs = [path for files in ref_lists for path in files]
    found: dict[str, list[LintFinding]] = {code: [] for code in CHECK_ORDER}

    def add(code: str, severity: str, message: str, files: Sequence[str]) -> None:
        if files:
            found[code].append(LintFinding(code, severity, message, tuple(sorted(files))))

    probes, unreadable = [], []
    for path in [*images, *refs]:
        try:
            probes.append((path, _probe(path)))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
            unreadable.append(_label(path, root))
    add("unreadable", "warning", "these files do not open as images: replace or remove them", unreadable)

    targets = [p for path, p in probes if path.parent == root]
    for group in duplicate_groups(targets):
        add(
            "duplicates",
            "warning",
            "near-duplicates (resized or re-encoded copies count): keep one of each group, or the LoRA learns "
            "that picture more than the others",
            group,
        )
    labelled = [(path, _label(path, root), p) for path, p in probes]
    small = [f"{name} ({p.size[0]}×{p.size[1]})" for _, name, p in labelled if min(p.size) < MIN_SHORT_SIDE]
    add(
        "small",
        "warning",
        f"short side below {MIN_SHORT_SIDE} px: they are upscaled and train soft; use larger originals",
        small,
    )
    wide = [
        f"{name} ({p.size[0]}×{p.size[1]})" for _, name, p in labelled if max(p.size) / min(p.size) > MAX_ASPECT_RATIO
    ]
    add("aspect", "warning", f"aspect ratio beyond {MAX_ASPECT_RATIO}:1: crop them to the subject", wide)
    sizes = bucket_sizes(resolution)
    cropped = []
    for _, name, p in labelled:
        bw, bh = choose_bucket(*p.size, sizes)
        kept = min(p.size[0] / p.size[1] / (bw / bh), (bw / bh) / (p.size[0] / p.size[1]))
        if 1.0 - kept > CROP_NOTE:
            cropped.append(f"{name} ({round((1 - kept) * 100)} % cropped)")
    add("crop", "note", f"bucketing at {resolution} crops more than {CROP_NOTE:.0%} of these pictures", cropped)

    missing, empty, no_trigger = [], [], []
    for path in images:
        caption = _caption_state(path)
        if caption is None:
            missing.append(path.name)
        elif not caption:
            empty.append(path.name)
        elif trigger.strip() and not _has_trigger(caption, trigger.strip()):
            no_trigger.append(path.name)
    add("missing_caption", "warning", "no .txt caption next to these images: write one per image", missing)
    add("empty_caption", "warning", "the .txt caption is empty: describe the image in it", empty)
    add(
        "no_trigger",
        "warning",
        f"caption without the trigger '{trigger.strip()}': add it (or '[trigger]') where it belongs; otherwise "
        "the dataset node prepends it",
        no_trigger,
    )
    flat = [name for path, name, p in labelled if path.parent == root and p.border < UNIFORM_BORDER_STD]
    add(
        "uniform_border",
        "warning",
        "nearly one flat colour around the subject: mix in pictures with real surroundings, or caption the "
        "backdrop ('on a plain white background') so the LoRA does not learn it",
        flat,
    )
    if ref_lists:
        match = match_references(ref_lists, images)
        whole = max(1, len(match.slots))
        lonely = [name for name, lacks in match.missing.items() if len(lacks) == whole]
        lonely += [_label(p, root) for p in match.lonely]
        add("pairs", "warning", "no same-name partner in the other folder: add the partner or remove the file", lonely)
        partial = [f"{name} (lacks {', '.join(lacks)})" for name, lacks in match.missing.items() if len(lacks) < whole]
        add(
            "missing_reference",
            "warning",
            f"every target needs all {whole} references ({', '.join(match.slots)}), in the same order as the "
            "reference latents: add the missing ones or remove the target",
            partial,
        )
    lo, hi = PRESET_ALBUM_SIZES[preset]
    unit = "pairs" if preset == "image_to_image" else "images"
    n = len(images)
    if n < lo:
        found["too_few"].append(
            LintFinding(
                "too_few", "warning", f"{n} {unit}: the course uses {lo}–{hi} for {preset}; add {lo - n} or more", ()
            )
        )
    elif n > hi:
        found["many"].append(
            LintFinding(
                "many", "note", f"{n} {unit}: more than the course's {lo}–{hi} for {preset} (fine if varied)", ()
            )
        )
    ordered = tuple(f for code in CHECK_ORDER for f in found[code])
    return LintReport(str(root), n, ordered)


def _label(path: Path, root: Path) -> str:
    """A file's name as the report shows it: the bare name inside the album, 'folder/name' elsewhere."""
    return path.name if path.parent == root else f"{path.parent.name}/{path.name}"
