"""Training albums: folder scanning, captions, trigger words, aspect buckets and image-to-image pairs.

An album is a folder of images (`png/jpg/jpeg/webp`) with same-name `.txt` captions. An image-to-image album
is a target folder and one or more reference folders matched by file stem (`pimpmyride_control/001.png` →
`pimpmyride/001.png`): the reference folders hold the inputs, the target folder the images the LoRA learns to
produce (and their captions). A target can have several references: one per reference folder, and inside a
folder files named `001_ref1.png`, `001_ref2.png`… (see match_references). Every target needs the same
references, in the same order: the order in which they are passed as reference latents.

Every image gets an aspect bucket: a (width, height) pair, both multiples of 16 (one FLUX.2 latent cell),
with an area no larger than base², whose aspect ratio is the nearest to the image's. Images are resized to
cover their bucket and centre-cropped, so a bucket's images stack into one batch. Pure python/PIL/torch.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import pack_error
from ..files.safe_paths import confined_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
BUCKET_MULTIPLE = 16  # one FLUX.2 latent cell is 16×16 pixels (VAE 1/8, then 2×2 patchified)
MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 … 4:1
TRIGGER_PLACEHOLDER = "[trigger]"
TRIGGER_MODES = ("prepend", "append", "none")


@pack_error
class DatasetError(ValueError):
    """An album that cannot be used as it is; the message names the files and the fix."""


@dataclass(frozen=True)
class DatasetItem:
    """One training example: the target image, its caption, its bucket and (image-to-image) its references, in
    the order they are passed as reference latents (reference 1 first)."""

    image: Path
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels, multiples of 16
    references: tuple[Path, ...] = ()
    caption_source: str = "file"  # "file" (its .txt) or "default" (no caption file: default caption / trigger)

    @property
    def reference(self) -> Path | None:
        """The first reference (None for a plain album)."""
        return self.references[0] if self.references else None


@dataclass(frozen=True)
class Dataset:
    """A scanned album: items in file-name order, the settings that produced them, and scan warnings."""

    items: tuple[DatasetItem, ...]
    resolution: int
    trigger: str
    kind: str  # "images" or "pairs"
    root: Path
    warnings: tuple[str, ...] = field(default=())
    reference_labels: tuple[str, ...] = field(default=())  # pairs: where reference 1, 2, … of a target come from

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    def buckets(self) -> Counter[tuple[int, int]]:
        return Counter(item.bucket for item in self.items)

    def summary(self) -> str:
        return summarize(self)


# ---------------------------------------------------------------------------------------------------- buckets


def bucket_sizes(
    resolution: int, multiple: int = BUCKET_MULTIPLE, max_aspect: float = MAX_ASPECT
) -> list[tuple[int, int]]:
    """All (width, height) buckets at this base resolution: multiples of `multiple`, area ≤ resolution².

    For each width the tallest height that keeps the area within budget is taken (and symmetrically for each
    height), so every bucket uses about the same pixel budget as a resolution² square.
    """
    if resolution < multiple or resolution % multiple != 0:
        lower = max(multiple, resolution // multiple * multiple)
        raise DatasetError(
            f"resolution={resolution}: must be a multiple of {multiple} and at least {multiple}. "
            f"Fix: use {lower} or {lower + multiple if lower < resolution else lower}."
        )
    area = resolution * resolution
    sizes: set[tuple[int, int]] = set()
    for side in range(multiple, int(resolution * math.sqrt(max_aspect)) + 1, multiple):
        other = (area // side) // multiple * multiple
        if other < multiple:
            continue
        for w, h in ((side, other), (other, side)):
            if max(w / h, h / w) <= max_aspect + 1e-9:
                sizes.add((w, h))
    return sorted(sizes)


def choose_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to width/height; ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise DatasetError(f"image size {width}×{height}: both sides must be positive.")
    target = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))


MIN_IMAGE_SIDE = 16  # one latent cell: a smaller image holds nothing to learn
MAX_IMAGE_PIXELS = 8192 * 8192  # refused before decoding (a decompression bomb claims far more in its header)


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """Image.open with every decoder failure turned into a DatasetError naming the file and the fix."""
    try:
        with Image.open(path) as img:
            yield img
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        raise DatasetError(f"image '{path}' is too large to decode safely ({err}). Fix: downscale it.") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports damaged files as any of these
        if isinstance(err, FileNotFoundError):
            raise DatasetError(f"image '{path}' does not exist (was it moved while scanning?).") from err
        why = "is truncated" if "truncated" in str(err) else "is not a readable image"
        raise DatasetError(
            f"image '{path}' {why} ({err}). Fix: re-export it as PNG or JPEG, or remove it from the album."
        ) from err


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (PIL modes I;16* and I, as 16-bit PNGs open) scaled to 8-bit grey: a plain convert would clip
    every value above 255 to white. (16-bit RGB PNGs already open as 8-bit RGB.)"""
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)  # [H, W] in 0..65535
        return Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def load_image(path: Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied (phones store portrait photos rotated). CMYK, 16-bit, palette
    and alpha images are converted (transparent pixels become white); a damaged file raises DatasetError."""
    with _open_image(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
        img = _to_8bit(img)
        if img.mode != "RGB":
            # Transparent pixels become white rather than whatever colour the file stored under alpha 0.
            if "A" in img.getbands() or img.mode == "P":
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("RGB")
        return img.copy()


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket (keeping aspect), then centre-crop to exactly bucket (width, height)."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    rw, rh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def image_tensor(img: Image.Image) -> Tensor:
    """PIL RGB → [H, W, 3] float32 in 0..1 (ComfyUI's IMAGE layout, without the batch axis)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def load_bucket_image(path: Path, bucket: tuple[int, int]) -> Tensor:
    """The image at `path` fitted to `bucket`: [H, W, 3] float32 in 0..1."""
    return image_tensor(fit_to_bucket(load_image(path), bucket))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read without decoding the pixels. Refuses unreadable files, images
    smaller than one latent cell and images too large to decode safely (checked from the header)."""
    with _open_image(path) as img:
        w, h = img.size
        if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
            raise DatasetError(
                f"image '{path}' is {w}×{h} pixels: images need at least {MIN_IMAGE_SIDE} pixels on each side. "
                "Fix: remove it or use a larger version."
            )
        if w * h > MAX_IMAGE_PIXELS:  # before getexif, which may read the whole file
            raise DatasetError(
                f"image '{path}' is {w}×{h} pixels, more than {MAX_IMAGE_PIXELS // 2**20} megapixels. Fix: "
                "downscale it (training uses about 1 megapixel per image anyway)."
            )
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ---------------------------------------------------------------------------------------------------- captions


def insert_trigger(caption: str, trigger: str, mode: str = "prepend") -> str:
    """Put the trigger word into a caption.

    `[trigger]` anywhere in the caption is replaced by the trigger (the caption decides where it goes).
    Otherwise, unless the trigger already appears as a whole word, it is prepended ("TOK, caption") or
    appended ("caption, TOK"); mode "none" leaves the caption alone.
    """
    if mode not in TRIGGER_MODES:
        raise DatasetError(f"trigger mode {mode!r}: use one of {', '.join(TRIGGER_MODES)}.")
    caption = caption.strip()
    trigger = trigger.strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger).strip()
    if not trigger or mode == "none" or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if mode == "prepend" else f"{caption}, {trigger}"


def trigger_free_caption(caption: str, trigger: str, class_word: str = "") -> str:
    """The caption without its trigger, for preservation: each whole-word trigger removed (with the comma that
    set it apart), or replaced by `class_word` when one is given ("TOK, a woman on a beach" -> "a woman on a
    beach"; with class "woman": "woman, a woman on a beach"). A caption of the trigger alone becomes the class
    word, or the empty caption."""
    trigger = trigger.strip()
    if not trigger:
        return caption.strip()
    pattern = rf"(?<!\w){re.escape(trigger)}(?!\w)"
    if class_word.strip():
        return re.sub(pattern, lambda _m: class_word.strip(), caption).strip()
    out = re.sub(pattern, "", caption)
    out = re.sub(r"\s+([,;])", r"\1", out)  # "a photo of , smiling" -> "a photo of, smiling"
    out = re.sub(r"([,;])(\s*[,;])+", r"\1", out)  # an empty list entry left where the trigger stood
    return re.sub(r"\s{2,}", " ", out).strip(" ,;")


def read_caption(image: Path) -> str | None:
    """The text of the same-name .txt next to the image, or None when there is none (or it is empty)."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        text = txt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"caption '{txt}' is not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r}). "
            "Fix: open it in a text editor and save it as UTF-8."
        ) from err
    return text or None


# ---------------------------------------------------------------------------------------------------- scanning


def list_images(folder: Path, roots: Sequence[Path | str] | None = None) -> list[Path]:
    """The album's images (png/jpg/jpeg/webp, any case), sorted by name; raises when the folder is unusable.

    Every image and every same-name .txt caption must really live inside `roots` (default: the album folder
    itself): a symlink leading out of the allowed folders is refused by name (UnsafePathError), never read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"dataset folder '{folder}' does not exist or is not a folder: give the album's path.")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(
            f"dataset folder '{folder}' has no images: put .png/.jpg/.jpeg/.webp files (with .txt captions) in it."
        )
    allowed = list(roots) if roots is not None else [folder]
    for image in images:
        confined_file(image, allowed, "image")
        caption = image.with_suffix(".txt")
        if caption.is_symlink() or caption.exists():
            confined_file(caption, allowed, "caption")
    stems = Counter(p.stem for p in images)
    clashes = sorted(stem for stem, n in stems.items() if n > 1)
    if clashes:
        raise DatasetError(
            f"dataset folder '{folder}': several images share a name, so their captions would be ambiguous: "
            f"{', '.join(clashes)}. Rename them so every image has its own name."
        )
    return images


def _caption_for(
    image: Path, trigger: str, mode: str, default_caption: str, fallback: Path | None = None
) -> tuple[str, str]:
    """(caption with trigger, source). A missing caption becomes the default caption, else the trigger alone."""
    text = read_caption(image)
    if text is None and fallback is not None:
        text = read_caption(fallback)
    if text is not None:
        return insert_trigger(text, trigger, mode), "file"
    return insert_trigger(default_caption, trigger, "prepend" if mode == "none" else mode), "default"


def _missing_caption_warning(items: Iterable[DatasetItem], default_caption: str, trigger: str) -> list[str]:
    missing = [item.image.name for item in items if item.caption_source == "default"]
    if not missing:
        return []
    used = repr(default_caption.strip()) if default_caption.strip() else "the trigger alone"
    if not default_caption.strip() and not trigger.strip():
        used = "an empty caption"
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return [f"{len(missing)} image(s) have no .txt caption and use {used}: {shown}."]


def scan_folder(
    folder: Path | str,
    resolution: int = 512,
    trigger: str = "TOK",
    trigger_mode: str = "prepend",
    default_caption: str = "",
    *,
    roots: Sequence[Path | str] | None = None,
) -> Dataset:
    """Scan an album folder: images, captions (trigger inserted), buckets at `resolution`. Files must really lie
    inside `roots` (the allowed folders; default: the album folder), see list_images."""
    root = Path(folder).expanduser()
    sizes = bucket_sizes(resolution)
    items = []
    for path in list_images(root, roots):
        caption, source = _caption_for(path, trigger, trigger_mode, default_caption)
        items.append(DatasetItem(path, caption, choose_bucket(*image_size(path), sizes), (), source))
    warnings = _missing_caption_warning(items, default_caption, trigger)
    return Dataset(tuple(items), resolution, trigger.strip(), "images", root, tuple(warnings))


REFERENCE_NUMBER = re.compile(r"^(?P<stem>.+)_ref(?P<number>\d+)$", re.IGNORECASE)


def reference_folder_lines(text: str) -> list[str]:
    """The folders of a multi-line widget: one per line, blank lines skipped, surrounding spaces dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class ReferenceMatch:
    """Targets matched to their references (see match_references).

    references: target stem -> its references in slot order (only targets that have every slot);
    slots: one label per reference slot, in order ('pimpmyride_control/<name>', 'refs/<name>_ref2');
    missing: target file name -> labels of the slots it lacks (all of them for a target without a reference);
    lonely: reference files that belong to no target.
    """

    references: dict[str, tuple[Path, ...]]
    slots: tuple[str, ...]
    missing: dict[str, tuple[str, ...]]
    lonely: tuple[Path, ...]


def _slot_of(path: Path, target_stems: set[str]) -> tuple[str, int]:
    """(target stem, reference number) of a reference file: '001_ref2.png' → ('001', 2), '001.png' → ('001', 0).
    A stem that is itself a target's name is that target's plain reference, so a target may be called 'x_ref1'."""
    found = REFERENCE_NUMBER.match(path.stem)
    if path.stem in target_stems or found is None:
        return path.stem, 0
    return found["stem"], int(found["number"])


def _slot_label(folder: Path, number: int, stem: str = "<name>") -> str:
    return f"{folder.name}/{stem}" + (f"_ref{number}" if number else "")


def match_references(reference_folders: Sequence[Sequence[Path]], targets: Sequence[Path]) -> ReferenceMatch:
    """Each target's references, from one or more folders of reference images matched by file stem.

    In every folder a target `001.png` takes `001.<ext>` as its reference, or `001_ref1.<ext>`, `001_ref2.<ext>`…
    as several (in number order). A slot is one (folder, number) that any target uses; the slots in folder
    order, then number order, are the reference latents 1, 2, … of every target (as ComfyUI's ReferenceLatent
    chains them: the first node's image is reference 1). Pure: raises nothing, scan_pairs and the lint decide.
    """
    target_stems = {p.stem for p in targets}
    found: dict[tuple[int, int], dict[str, Path]] = {}
    lonely: list[Path] = []
    for k, files in enumerate(reference_folders):
        for path in files:
            stem, number = _slot_of(path, target_stems)
            if stem not in target_stems:
                lonely.append(path)
            else:
                found.setdefault((k, number), {})[stem] = path
    order = sorted(found)
    folders = [files[0].parent if files else Path() for files in reference_folders]
    references: dict[str, tuple[Path, ...]] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for target in sorted(targets, key=lambda p: p.stem):
        lacks = tuple(_slot_label(folders[k], n, target.stem) for k, n in order if target.stem not in found[(k, n)])
        if lacks or not order:
            missing[target.name] = lacks or ("a reference",)
        else:
            references[target.stem] = tuple(found[slot][target.stem] for slot in order)
    slots = tuple(_slot_label(folders[k], n) for k, n in order)
    return ReferenceMatch(references, slots, missing, tuple(lonely))


def _pairing_error(match: ReferenceMatch) -> DatasetError:
    """One error naming every target that lacks a reference and every reference without a target."""
    lines = ["image-to-image pairs are matched by file name, and some files have no partner:"]
    without = [name for name, lacks in match.missing.items() if len(lacks) == max(1, len(match.slots))]
    partial = {name: lacks for name, lacks in match.missing.items() if name not in without}
    if without:
        lines.append(f"  targets without a reference ({len(without)}): {', '.join(without)}")
    if partial:
        shown = "; ".join(f"{name} lacks {', '.join(lacks)}" for name, lacks in partial.items())
        lines.append(f"  targets with missing references ({len(partial)}): {shown}")
    if match.lonely:
        names = ", ".join(p.name for p in match.lonely)
        lines.append(f"  references without a target ({len(match.lonely)}): {names}")
    lines.append(
        "Add the missing files or remove these, so every target has the same references under its own name "
        "(001.png → 001.png in each reference folder, or 001_ref1.png, 001_ref2.png…)."
    )
    return DatasetError("\n".join(lines))


def scan_pairs(
    reference_folder: Path | str | Sequence[Path | str],
    target_folder: Path | str,
    resolution: int = 512,
    trigger: str = "TOK",
    trigger_mode: str = "prepend",
    default_caption: str = "",
    *,
    roots: Sequence[Path | str] | None = None,
) -> Dataset:
    """Scan an image-to-image album: a target folder and one or more reference folders (a list, in reference
    order), matched by name (match_references); captions from the target side (falling back to the first
    reference's .txt); every reference of a target shares the target's bucket."""
    given = [reference_folder] if isinstance(reference_folder, (str, Path)) else list(reference_folder)
    ref_roots = [Path(folder).expanduser() for folder in given]
    tgt_root = Path(target_folder).expanduser()
    if not ref_roots:
        raise DatasetError("no reference folder given: name the folder of the input images (one per line).")
    seen: dict[Path, Path] = {tgt_root.resolve(): tgt_root}
    for ref_root in ref_roots:
        if ref_root.resolve() in seen:
            other = seen[ref_root.resolve()]
            what = "reference and target folder are" if other == tgt_root else "two reference folders are"
            raise DatasetError(f"{what} the same ('{ref_root}'): give each folder once.")
        seen[ref_root.resolve()] = ref_root
    sizes = bucket_sizes(resolution)
    targets = list_images(tgt_root, roots if roots is not None else [tgt_root])
    listed = [list_images(ref_root, roots if roots is not None else [ref_root]) for ref_root in ref_roots]
    match = match_references(listed, targets)
    if match.missing or match.lonely:
        raise _pairing_error(match)
    items = []
    for tgt in sorted(targets, key=lambda p: p.stem):
        refs = match.references[tgt.stem]
        caption, source = _caption_for(tgt, trigger, trigger_mode, default_caption, fallback=refs[0])
        items.append(DatasetItem(tgt, caption, choose_bucket(*image_size(tgt), sizes), refs, source))
    warnings = _missing_caption_warning(items, default_caption, trigger)
    return Dataset(tuple(items), resolution, trigger.strip(), "pairs", tgt_root, tuple(warnings), match.slots)


# ---------------------------------------------------------------------------------------------------- summary


def album_files_hash(dataset: Dataset) -> str:
    """A short content hash of the album (image bytes, captions, buckets): the LoRA's 'dataset hash'."""
    digest = hashlib.sha256()
    for item in dataset.items:
        for path in (*item.references, item.image):
            digest.update(file_hash(path).encode())
        digest.update(item.caption.encode("utf-8"))
        digest.update(f"{item.bucket}".encode())
    return digest.hexdigest()[:16]


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def summarize(dataset: Dataset) -> str:
    """A readable summary: counts, buckets, caption statistics and warnings (read it before training)."""
    n = len(dataset.items)
    what = "pairs (reference → target)" if dataset.kind == "pairs" else "images"
    if len(dataset.reference_labels) > 1:
        what = f"pairs ({len(dataset.reference_labels)} references → target)"
    lines = [f"{n} {what} in '{dataset.root}' at base resolution {dataset.resolution}"]
    if len(dataset.reference_labels) > 1:
        refs = ", ".join(f"{k} = {label}" for k, label in enumerate(dataset.reference_labels, 1))
        lines.append(f"references (in reference-latent order): {refs}")
    buckets = dataset.buckets()
    lines.append(f"buckets ({len(buckets)}):")
    for (w, h), count in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {w}×{h}: {count}")
    words = [len(c.split()) for c in dataset.captions()]
    from_file = sum(1 for item in dataset.items if item.caption_source == "file")
    lines.append(f"captions: {from_file} from .txt files, {n - from_file} default")
    if words:
        lines.append(f"caption words: min {min(words)}, mean {sum(words) / n:.1f}, max {max(words)}")
    if dataset.trigger:
        with_trigger = sum(1 for c in dataset.captions() if re.search(rf"(?<!\w){re.escape(dataset.trigger)}(?!\w)", c))
        lines.append(f"trigger '{dataset.trigger}' in {with_trigger} of {n} captions")
    unique = len(set(dataset.captions()))
    if unique < n:
        lines.append(f"distinct captions: {unique} of {n}")
    lines.extend(f"warning: {w}" for w in dataset.warnings)
    return "\n".join(lines)
