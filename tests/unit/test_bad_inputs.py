"""Bad inputs, table-driven: each is refused by the pack's own code with an error naming the file or value and a fix,
or (CMYK, 16-bit, alpha images) accepted and converted to what the trainer expects.

A refusal row asserts: the exception type, the words that name the bad file/value, a fix in the message, and that
the innermost frame of the traceback is the pack's code (no KeyError/IndexError/decoder error from deep inside).
"""

from __future__ import annotations

import struct
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from klein_lora_lab.trainer_core.album.dataset import DatasetError, load_bucket_image, scan_folder, scan_pairs
from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
from klein_lora_lab.trainer_core.lora.lora_file import load_lora, save_lora
from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError, read_lora_file
from klein_lora_lab.trainer_core.model.klein import KleinShape, read_shape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from klein_lora_lab.trainer_core.training.trainer import NonFiniteLossError, train
from PIL import Image
from safetensors.torch import save_file
from torch import nn

PACK_ROOT = Path(__file__).resolve().parents[2]
SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
KLEIN_4B = KleinShape(hidden=3072, heads=24, double_blocks=5, single_blocks=20, context_dim=7680)
KLEIN_9B = KleinShape(hidden=4096, heads=32, double_blocks=8, single_blocks=24, context_dim=12288)
FIX = r"(?i)fix|use |give |put |remove|rename|save it|add |re-?encode|re-?export|download|load |lower|resume with"


# ------------------------------------------------------------------------------------------------ builders


def _album(tmp: Path, files: dict[str, Image.Image | bytes]) -> Path:
    folder = tmp / "album"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            content.save(folder / name)
    return folder


def _png_bytes(img: Image.Image) -> bytes:
    path_free = __import__("io").BytesIO()
    img.save(path_free, format="PNG")
    return path_free.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width×height (a decompression bomb is judged by its header)."""
    data = bytearray(_png_bytes(Image.new("RGB", (8, 8), (1, 2, 3))))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF)
    return bytes(data)


def _scan_and_load(folder: Path) -> None:
    """What the encode node does with an album: scan it, then load every image into its bucket."""
    for item in scan_folder(folder, 64).items:
        load_bucket_image(item.image, item.bucket)


def _lora_file(tmp: Path, tensors: dict[str, torch.Tensor], name: str = "lora.safetensors") -> Path:
    path = tmp / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _klein_lora(shape: KleinShape, rank: int = 2) -> dict[str, torch.Tensor]:
    h = shape.hidden
    return {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(rank, h) * 0.01,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * h, rank) * 0.01,
        "diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.randn(rank, 4 * h) * 0.01,
        "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.randn(h, rank) * 0.01,
    }


def _tiny_shape() -> KleinShape:
    return read_shape(tiny_klein(SPEC))


def _tiny_lora_file(tmp: Path) -> Path:
    path = tmp / "tiny.safetensors"
    shape = _tiny_shape()
    weights = {
        "double_blocks.0.img_attn.qkv": LoraWeights(torch.randn(4, shape.hidden), torch.randn(3 * shape.hidden, 4), 4.0)
    }
    save_lora(path, weights, {})
    return path


def _items(n: int = 2) -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), (), name=f"i{i}")
        for i in range(n)
    ]


def _train(tmp: Path, model: nn.Module, items: list[TrainItem] | None = None) -> None:
    s = TrainSettings(rank=4, alpha=4, steps=2, checkpoint_every=0)
    train(model, _items() if items is None else items, s, RunFolder.create(tmp / "run", s, {}))


class _SDXLish(nn.Module):
    """Module names of an SDXL UNet (what UNETLoader returns for one), tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Conv2d(4, 8, 3)])
        self.middle_block = nn.ModuleList([nn.Conv2d(8, 8, 3)])
        self.out = nn.Conv2d(8, 4, 3)


class _Flux1ish(nn.Module):
    """FLUX.1 names and widths: img_in takes 64 channels (16-channel latents, 2×2 patches)."""

    def __init__(self) -> None:
        super().__init__()
        self.img_in = nn.Linear(64, 128)
        self.txt_in = nn.Linear(32, 128)
        self.double_blocks = nn.ModuleList()
        self.single_blocks = nn.ModuleList()
        self.double_stream_modulation_img = nn.Linear(128, 128)


def _nan_model() -> nn.Module:
    model = tiny_klein(SPEC)
    with torch.no_grad():
        model.single_blocks[0].linear1.weight[0, 0] = float("nan")
    return model


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Refused:
    name: str
    run: Callable[[Path], object]
    error: type[BaseException]
    names: tuple[str, ...]  # words that must appear: the bad file or value


REFUSED = [
    Refused("empty folder", lambda t: scan_folder(_album(t, {}), 64), DatasetError, ("album", "no images")),
    Refused("missing folder", lambda t: scan_folder(t / "nope", 64), DatasetError, ("nope",)),
    Refused(
        "corrupt image",
        lambda t: scan_folder(_album(t, {"a.png": b"\x89PNG\r\n\x1a\nthis is not an image"}), 64),
        DatasetError,
        ("a.png",),
    ),
    Refused(
        "truncated image",
        lambda t: _scan_and_load(_album(t, {"a.png": _png_bytes(_noise(64, 64))[:300]})),
        DatasetError,
        ("a.png", "truncated"),
    ),
    Refused(
        "1-pixel image",
        lambda t: scan_folder(_album(t, {"dot.png": Image.new("RGB", (1, 1))}), 64),
        DatasetError,
        ("dot.png", "1×1"),
    ),
    Refused(
        "huge image (decompression bomb)",
        lambda t: scan_folder(_album(t, {"bomb.png": _png_claiming(30000, 30000)}), 64),
        DatasetError,
        ("bomb.png", "too large"),
    ),
    Refused(
        "huge image (over 64 megapixels)",
        lambda t: scan_folder(_album(t, {"big.png": _png_claiming(12000, 9000)}), 64),
        DatasetError,
        ("big.png", "12000×9000"),
    ),
    Refused(
        "caption with bad encoding",
        lambda t: scan_folder(
            _album(t, {"a.png": Image.new("RGB", (32, 32)), "a.txt": "caf\xe9 cr\xe8me".encode("latin-1")}), 64
        ),
        DatasetError,
        ("a.txt", "UTF-8"),
    ),
    Refused(
        "pairs with missing partners",
        lambda t: scan_pairs(
            _album(t, {"001.png": Image.new("RGB", (32, 32)), "002.png": Image.new("RGB", (32, 32))}),
            _album(t.parent / (t.name + "_targets"), {"001.png": Image.new("RGB", (32, 32))}),
            64,
        ),
        DatasetError,
        ("002.png",),
    ),
    Refused(
        "resolution not a multiple of 16",
        lambda t: scan_folder(_album(t, {"a.png": Image.new("RGB", (32, 32))}), 500),
        DatasetError,
        ("resolution=500", "496", "512"),
    ),
    Refused("rank 0", lambda t: TrainSettings(rank=0), SettingsError, ("rank=0",)),
    Refused("rank negative", lambda t: TrainSettings(rank=-4), SettingsError, ("rank=-4",)),
    Refused("learning rate 0", lambda t: TrainSettings(learning_rate=0.0), SettingsError, ("learning_rate=0",)),
    Refused("learning rate 10", lambda t: TrainSettings(learning_rate=10.0), SettingsError, ("learning_rate=10",)),
    Refused("steps 0", lambda t: TrainSettings(steps=0), SettingsError, ("steps=0",)),
    Refused(
        "truncated safetensors (our loader)",
        lambda t: load_lora(_truncate(_tiny_lora_file(t))),
        ValueError,
        ("tiny.safetensors", "truncated"),
    ),
    Refused(
        "truncated safetensors (any-format reader)",
        lambda t: read_lora_file(_truncate(_tiny_lora_file(t)), _tiny_shape()),
        LoraFormatError,
        ("tiny.safetensors", "truncated"),
    ),
    Refused(
        "not a safetensors file",
        lambda t: read_lora_file(_write(t / "fake.safetensors", b"<html>404</html>"), _tiny_shape()),
        LoraFormatError,
        ("fake.safetensors",),
    ),
    Refused(
        "NaN weights in a LoRA file",
        lambda t: read_lora_file(_lora_file(t, _nan(_klein_lora(_tiny_shape()))), _tiny_shape()),
        LoraFormatError,
        ("lora.safetensors", "NaN"),
    ),
    Refused(
        "NaN weights in a LoRA file (our loader)",
        lambda t: load_lora(
            _lora_file(t, {**_nan(_klein_lora(_tiny_shape())), "diffusion_model.x.alpha": torch.tensor(2.0)})
        ),
        ValueError,
        ("lora.safetensors", "NaN"),
    ),
    Refused(
        "LoRA of the other Klein size (4B LoRA on 9B)",
        lambda t: read_lora_file(_lora_file(t, _klein_lora(KLEIN_4B)), KLEIN_9B),
        LoraFormatError,
        ("lora.safetensors", "3072"),
    ),
    Refused(
        "LoRA of the other Klein size (9B LoRA on 4B)",
        lambda t: read_lora_file(_lora_file(t, _klein_lora(KLEIN_9B)), KLEIN_4B),
        LoraFormatError,
        ("lora.safetensors", "4096"),
    ),
    Refused(
        "SDXL LoRA",
        lambda t: read_lora_file(
            _lora_file(
                t,
                {
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
                },
            ),
            _tiny_shape(),
        ),
        LoraFormatError,
        ("lora.safetensors", "SDXL"),
    ),
    Refused(
        "FLUX.1 LoRA",
        lambda t: read_lora_file(
            _lora_file(
                t,
                {
                    "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(4, 3072),
                    "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(18432, 4),
                },
            ),
            _tiny_shape(),
        ),
        LoraFormatError,
        ("lora.safetensors", "FLUX.1"),
    ),
    Refused("SDXL model", lambda t: _train(t, _SDXLish()), ValueError, ("FLUX.2 [klein]", "img_in")),
    Refused("FLUX.1 model", lambda t: _train(t, _Flux1ish()), ValueError, ("64 channels",)),
    Refused(
        "NaN weights in the model", lambda t: _train(t, _nan_model()), NonFiniteLossError, ("single_blocks.0.linear1",)
    ),
    Refused("no training items", lambda t: _train(t, tiny_klein(SPEC), []), ValueError, ("empty",)),
]


def _noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _nan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    return tensors


@pytest.mark.parametrize("row", REFUSED, ids=[r.name for r in REFUSED])
def test_bad_input_is_refused_by_name_with_a_fix(row: Refused, tmp_path: Path) -> None:
    """Each bad input raises the pack's own error naming the file/value and saying what to do; the innermost frame
    of the traceback is the pack's code, not a library's (no decoder/KeyError/IndexError leaking out)."""
    with pytest.raises(row.error) as info:
        row.run(tmp_path)
    message = str(info.value)
    for word in row.names:
        assert word in message, f"{row.name}: {word!r} missing from: {message}"
    assert __import__("re").search(FIX, message), f"{row.name}: no fix in: {message}"
    innermost = Path(traceback.extract_tb(info.tb)[-1].filename).resolve()
    assert PACK_ROOT in innermost.parents and "tests" not in innermost.relative_to(PACK_ROOT).parts, (
        f"{row.name}: raised from {innermost}, not by the pack: {message}"
    )


# ------------------------------------------------------------------------------------------------ accepted


def _cmyk_jpeg(tmp: Path) -> Path:
    path = tmp / "cmyk.jpg"
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    return path


def _gray16_png(tmp: Path) -> Path:
    path = tmp / "gray16.png"
    Image.fromarray(np.full((32, 48), 32768, dtype=np.uint16)).save(path)  # mid grey in 16 bits
    return path


def _rgba_png(tmp: Path) -> Path:
    path = tmp / "alpha.png"
    img = Image.new("RGBA", (48, 32), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 24, 32))  # left half fully transparent (stored black)
    img.save(path)
    return path


def _rgb48_png(tmp: Path) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    w, h = 48, 32
    row = b"\x00" + (struct.pack(">HHH", 65535, 32768, 0) * w)
    raw = zlib.compress(row * h)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp / "rgb48.png"
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


ACCEPTED = [
    ("CMYK JPEG", _cmyk_jpeg, (1.0, 0.0, 0.0), None),
    ("16-bit grey PNG", _gray16_png, (0.5, 0.5, 0.5), None),
    ("16-bit RGB PNG", _rgb48_png, (1.0, 0.5, 0.0), None),
    ("alpha PNG: opaque half", _rgba_png, (0.0, 0.0, 1.0), "right"),
    ("alpha PNG: transparent half becomes white", _rgba_png, (1.0, 1.0, 1.0), "left"),
]


@pytest.mark.parametrize(("name", "make", "rgb", "half"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_unusual_image_modes_are_converted(
    name: str, make, rgb: tuple[float, ...], half: str | None, tmp_path: Path
) -> None:
    """CMYK, 16-bit and alpha images are accepted: scanned like any image and loaded as RGB in 0..1 with the colour
    they show (16-bit values scaled, not clipped; transparent pixels white)."""
    make(tmp_path)
    dataset = scan_folder(tmp_path, 64)
    assert len(dataset) == 1
    item = dataset.items[0]
    pixels = load_bucket_image(item.image, item.bucket)  # [H, W, 3]
    assert pixels.shape[-1] == 3 and pixels.dtype == torch.float32
    w = pixels.shape[1]
    region = {None: pixels, "left": pixels[:, : w // 4], "right": pixels[:, -w // 4 :]}[half]
    mean = region.reshape(-1, 3).mean(0)
    assert torch.allclose(mean, torch.tensor(rgb), atol=0.03), f"{name}: mean colour {mean.tolist()} != {rgb}"


def test_table_counts() -> None:
    """The tables stay as large as docs/reliability.md says (a row removed must be removed there too)."""
    assert len(REFUSED) == 28 and len(ACCEPTED) == 5
