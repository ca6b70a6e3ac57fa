"""A large album through the nodes: N images around 1024² in several aspect buckets, encoded by the Encode Dataset
node and trained by the Train node's path with batch 4.

What an artist's run does, step by step, on a generated album (gradients, shapes and noise from a seeded
generator, saved as JPEG or PNG with a .txt caption each):

  scan    `Klein Dataset (Folder)`'s execute on the album (its widget defaults, resolution --res): the buckets;
  encode  `Klein Encode Dataset (cached)`'s execute (its default validation prompts and preservation class)
          with a VAE and a text encoder, into an empty cache; then once more on the warm cache;
  train   `train_in_comfy` (what the Train node's execute calls) with the Train node's widget defaults, batch
          --batch, --steps steps, no previews, memory auto (no Training Options connected).

--full-size (CUDA): the full-size FLUX.2 VAE and Klein's Qwen3 text encoder (4B for --variant 4b, 8B for 9b)
through ComfyUI's own loaders (`comfy.sd.VAE`, `comfy.sd.load_text_encoder_state_dicts`, as Load VAE and Load
CLIP type flux2 build them), and the full-size Klein from benchmarks/train_bench.py's `load_klein`, all random
weights of the real shapes: the speed and memory of the real models, not their pictures.
Without it: the tiny Klein, the same full-shape VAE on the CPU and a stand-in text encoder behind ComfyUI's CLIP
interface (tests/harness/comfy_test_nodes.FakeClip), at a small resolution: a smoke run of the same path.

Figures: encode seconds (total, per image, the text encoder's and the VAE's calls apart, the warm pass), cache
bytes on disk (total, per image, latents and conditionings apart), buckets and images per bucket; s/step (median
after --warmup, from the run's metrics.jsonl), images/s, peak GiB, the steps that compiled a new shape. One JSON
line per phase on stdout (appended to --jsonl), a short table at the end, progress with timestamps on stderr.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/album_bench.py --full-size --images 200 --steps 40
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/album_bench.py --images 8 --steps 4     # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness.comfy_env import comfy_path, import_comfy_inprocess  # noqa: E402
from harness.pack import register_pack  # noqa: E402

# Aspect ratios (width:height) of the generated images, one image each in turn: square first, then the photo
# formats an artist's album mixes. Each lands in the pack's bucket of the nearest aspect (album/dataset.py).
DEFAULT_ASPECTS = "1:1,2:3,3:2,3:4,16:9"
IMAGE_SCALE = 1.2  # images are a little larger than their bucket, so scanning resizes them as it would a photo
ALBUM_FOLDER = "album"  # under ComfyUI's input folder (the workdir's), as an artist's album would be
STARTED = time.perf_counter()

SUBJECTS = ("a ceramic vase", "a red bicycle", "an old lighthouse", "a tabby cat", "a paper lantern", "a teapot")
PLACES = ("on a wooden table", "by the sea", "in a snowy field", "in a sunlit kitchen", "under a stone arch")
LOOKS = ("soft morning light", "dramatic shadows", "overcast sky", "neon glow", "golden hour")
STYLES = ("ink wash painting", "oil on canvas", "flat vector art", "35mm film photo", "watercolour")


def log(message: str) -> None:
    """A progress line on stderr: wall-clock time and seconds since the benchmark started."""
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True
    )


# ---------------------------------------------------------------------------------------------------- the album


def parse_aspects(text: str) -> list[tuple[int, int]]:
    """'1:1,3:2' -> [(1, 1), (3, 2)] (width:height)."""
    out = []
    for part in text.split(","):
        w, _, h = part.strip().partition(":")
        if not (w.isdigit() and h.isdigit()) or int(w) == 0 or int(h) == 0:
            raise SystemExit(f"--aspects: {part!r} is not width:height (e.g. 3:2)")
        out.append((int(w), int(h)))
    return out


def image_size(aspect: tuple[int, int], res: int, scale: float = IMAGE_SCALE) -> tuple[int, int]:
    """(width, height) of an image of this aspect with about (scale·res)² pixels."""
    side = scale * res
    ratio = aspect[0] / aspect[1]
    return max(16, round(side * math.sqrt(ratio))), max(16, round(side / math.sqrt(ratio)))


def album_image(index: int, size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic picture: a two-colour gradient at a random angle, a few soft discs, film-like noise."""
    rng = np.random.default_rng([seed, index])
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)  # [h, w] each
    angle = rng.uniform(0.0, 2.0 * math.pi)
    t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    c0, c1 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    pixels = c0 + (c1 - c0) * t[..., None]  # [h, w, 3]
    for _ in range(3):
        cx, cy, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9) * h / max(w, h), rng.uniform(0.05, 0.25)
        weight = np.clip(1.5 - np.hypot(x - cx, y - cy) / radius, 0.0, 1.0)[..., None]
        pixels = pixels * (1 - weight) + rng.uniform(0.0, 255.0, 3).astype(np.float32) * weight
    pixels += rng.normal(0.0, 10.0, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def album_caption(index: int, seed: int) -> str:
    """A deterministic caption without the trigger (the folder node prepends it)."""
    rng = np.random.default_rng([seed, index, 1])
    return ", ".join(str(rng.choice(words)) for words in (SUBJECTS, PLACES, LOOKS, STYLES))


def write_album(folder: Path, count: int, res: int, aspects: Sequence[tuple[int, int]], fmt: str, seed: int) -> dict:
    """`count` images (aspects in turn) with .txt captions in `folder`; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def one(i: int) -> int:
        image = folder / f"{i:04d}.{fmt}"
        picture = album_image(i, image_size(aspects[i % len(aspects)], res), seed)
        picture.save(image, quality=92) if fmt == "jpg" else picture.save(image)
        image.with_suffix(".txt").write_text(album_caption(i, seed), encoding="utf-8")
        return image.stat().st_size

    with ThreadPoolExecutor(max_workers=min(16, max(1, count))) as pool:  # PIL's encoders release the GIL
        sizes = list(pool.map(one, range(count)))
    return {"album_bytes": sum(sizes), "album_write_s": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------------------- encoders


class Timed:
    """`target` with every attribute forwarded, the calls of `methods` timed (their seconds summed by name).

    The node keeps its own path: it gets the same object's attributes (its weights for the cache identity,
    tokenize, encode…); only the wall time of the named calls is recorded."""

    def __init__(self, target: Any, methods: Sequence[str]) -> None:
        self._target = target
        self._methods = frozenset(methods)
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in self._methods:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


def random_vae():
    """The full-shape FLUX.2 VAE from random weights, built by ComfyUI as Load VAE builds it."""
    import comfy.sd
    from harness.vae import flux2_vae_state_dict

    return comfy.sd.VAE(sd=flux2_vae_state_dict(seed=0))


QWEN3 = {"4b": "Qwen3_4B", "9b": "Qwen3_8B"}  # Klein 4B reads Qwen3 4B, Klein 9B Qwen3 8B


def random_text_encoder(variant: str, device: str = "cuda"):
    """Klein's Qwen3 text encoder as Load CLIP (type flux2) gives it: ComfyUI's text-encoder loader on a state
    dict of the checkpoint's keys and shapes (read from ComfyUI's own Qwen3 module, built on the meta device),
    random values (std 0.02, norms 1) drawn on `device` and handed over on the CPU as a file's would be."""
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.llama as llama

    module = getattr(llama, QWEN3[variant])
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in module({}, torch.bfloat16, "meta", comfy.ops.disable_weight_init).state_dict().items()
        }
    gen = torch.Generator(device).manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            sd[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            sd[key] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
    clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.FLUX2)
    del sd
    return clip


def on_cuda() -> bool:
    """Whether ComfyUI computes on a CUDA device here (a smoke run on a GPU machine stays on the CPU)."""
    import comfy.model_management

    return comfy.model_management.get_torch_device().type == "cuda"


def node_defaults(node: type) -> dict[str, Any]:
    """Every input's default in a node's schema: what a node dropped on the canvas starts with."""
    return {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}


@contextmanager
def progress_log(label: str, every_s: float = 10.0) -> Iterator[None]:
    """Log ComfyUI progress-bar updates (the nodes' own bars) at most every `every_s` seconds, and the last one."""
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    last = [-math.inf]

    def hook(value: int, total: int, preview: Any = None, node_id: str | None = None, **_kwargs: Any) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s or value >= total:
            last[0] = now
            log(f"{label} {value}/{total}")

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


# ---------------------------------------------------------------------------------------------------- phases


def cache_contents(root: Path) -> dict[str, int]:
    """Entries and bytes (file sizes) of the encode cache under `root`: image latents and text conditionings
    apart (told by the metadata each entry is written with: latent_cache.encode_album)."""
    from safetensors import safe_open

    out = Counter()
    for path in root.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as entry:
            kind = "latent" if "file" in (entry.metadata() or {}) else "text"
        size = path.stat().st_size
        out[f"{kind}_entries"] += 1
        out[f"{kind}_bytes"] += size
        out["cache_files"] += 1
        out["cache_bytes"] += size
    return dict(out)


def encode_phase(res: int, vae: Any, clip: Any) -> tuple[Any, dict]:
    """The folder node's scan and the encode node's execute (cold cache, then warm), as a workflow runs them."""
    from klein_lora_lab.nodes.comfy.paths import cache_dir
    from klein_lora_lab.nodes.train.dataset_folder import KleinLabDatasetFolder
    from klein_lora_lab.nodes.train.encode_dataset import KleinLabEncodeDataset

    folder = node_defaults(KleinLabDatasetFolder)
    start = time.perf_counter()
    dataset, _summary = KleinLabDatasetFolder.execute(
        ALBUM_FOLDER, folder["trigger"], folder["trigger_mode"], res, folder["default_caption"]
    ).result
    scan_s = time.perf_counter() - start
    buckets = {f"{w}x{h}": n for (w, h), n in sorted(dataset.buckets().items(), key=lambda kv: (-kv[1], kv[0]))}
    log(f"scanned {len(dataset)} images in {scan_s:.1f} s: buckets {buckets}")

    encode = node_defaults(KleinLabEncodeDataset)
    timed_vae, timed_clip = Timed(vae, ["encode"]), Timed(clip, ["tokenize", "encode_from_tokens_scheduled"])

    def run_node() -> tuple[Any, float]:
        t0 = time.perf_counter()
        with progress_log("encoding"), torch.inference_mode():  # as ComfyUI runs a node
            encoded, _report = KleinLabEncodeDataset.execute(
                dataset,
                timed_vae,
                encode["validation_prompts"],
                clip=timed_clip,
                preservation_class=encode["preservation_class"],
            ).result
        if on_cuda():
            torch.cuda.synchronize()
        return encoded, time.perf_counter() - t0

    encoded, cold_s = run_node()
    log(f"encoded: {encoded.report()}")
    text_s, image_s = sum(timed_clip.seconds.values()), timed_vae.seconds["encode"]
    texts = timed_clip.calls["encode_from_tokens_scheduled"]
    warm, warm_s = run_node()
    log(f"again on the warm cache: {warm.report()}")
    cache = cache_contents(cache_dir())
    n = len(dataset)
    context = encoded.items[0].context  # [tokens, ctx]: what one caption costs in the cache and in memory
    record = {
        "phase": "encode",
        "images": n,
        "resolution": res,
        "bucket_count": len(buckets),
        "buckets": buckets,
        "latent_shapes": sorted({"x".join(map(str, item.latent.shape)) for item in encoded.items}),
        "context": " ".join(("x".join(map(str, context.shape)), str(context.dtype).removeprefix("torch."))),
        "scan_s": round(scan_s, 3),
        "encode_s": round(cold_s, 3),
        "encode_s_per_image": round(cold_s / n, 4),
        "vae_s": round(image_s, 3),
        "vae_s_per_image": round(image_s / max(1, timed_vae.calls["encode"]), 4),
        "text_encoder_s": round(text_s, 3),
        "texts_encoded": texts,
        "text_s_per_caption": round(text_s / max(1, texts), 4),
        "other_s": round(cold_s - image_s - text_s, 3),  # reading, resizing and hashing images, cache writes
        "entries_encoded": encoded.encoded,
        "warm_encode_s": round(warm_s, 3),
        "warm_entries_cached": warm.cached,
        "warm_entries_encoded": warm.encoded,
        **cache,
        "cache_bytes_per_image": round(cache.get("cache_bytes", 0) / n),
        "latent_bytes_per_image": round(cache.get("latent_bytes", 0) / n),
    }
    return encoded, record


def train_widgets() -> tuple[str, dict[str, Any]]:
    """The Train node's preset and training widgets at their defaults (the widgets its execute passes on to
    settings_from_widgets)."""
    from klein_lora_lab.nodes.train.train_lora import KleinLabTrainLora

    defaults = node_defaults(KleinLabTrainLora)
    named = set(inspect.signature(KleinLabTrainLora.execute).parameters)  # model, preset, run_name, …
    return defaults["preset"], {k: v for k, v in defaults.items() if k not in named}


def train_phase(patcher: Any, encoded: Any, steps: int, batch: int, warmup: int, compile_mode: str = "auto") -> dict:
    """The Train node's path on the encoded album: its widget defaults with `steps` and `batch` (previews off),
    Training Options absent (memory auto; with `compile_mode` other than auto, Training Options with only that
    compile set), `train_in_comfy` under inference mode as ComfyUI runs a node."""
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.nodes.comfy.train_setup import new_or_resumed_run, settings_from_widgets
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.training.data import BatchOrder, holdout_split
    from klein_lora_lab.trainer_core.training.options import TrainingOptions, with_options

    preset_name, widgets = train_widgets()
    widgets.update(steps=steps, batch_size=batch, sample_every=0)
    options = None if compile_mode == "auto" else TrainingOptions(compile=compile_mode)
    settings = with_options(settings_from_widgets(preset_name, **widgets), options)
    register_runs_folder()
    run = new_or_resumed_run(f"album-bench-{uuid.uuid4().hex[:8]}", settings, encoded, resume=False)
    cuda = on_cuda()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log(f"training {steps} steps, batch {batch}, preset {preset_name!r}, {len(encoded.items)} items")
    start = time.perf_counter()
    with progress_log("training step"), torch.inference_mode():
        outcome = train_in_comfy(patcher, encoded.items, settings, run, False, None, None, encoded.empty_context)
    wall_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    seconds = [r["seconds"] for r in run.read_metrics() if "seconds" in r]
    log(f"trained {len(seconds)} steps in {wall_s:.1f} s: {outcome.message}")

    # Which items each step trained on: the trainer's own hold-out split and batch order, rebuilt.
    train_idx, held_idx = holdout_split(len(encoded.items), settings.validation_holdout, settings.seed)
    items = [encoded.items[i] for i in train_idx]
    order = BatchOrder(items, settings.batch_size, settings.seed)
    shapes = []
    for step in range(1, len(seconds) + 1):
        micro = [order.batch((step - 1) * settings.grad_accum + m) for m in range(settings.grad_accum)]
        h, w = items[micro[0][0]].latent.shape[-2:]
        shapes.append((f"{w * 16}x{h * 16}", sum(len(m) for m in micro)))
    measured = list(range(min(warmup, len(seconds) - 1), len(seconds)))
    median = statistics.median(seconds[i] for i in measured)
    # A step that takes much longer than the median is (on a GPU) a new shape compiling: torch.compile makes one
    # graph per (bucket, batch size), and a bucket's last batch of an epoch may be short.
    slow = [i for i in range(len(seconds)) if seconds[i] > 3 * median]
    steady = [i for i in measured if i not in slow]
    per_bucket: dict[str, list[float]] = {}
    for i in steady:
        per_bucket.setdefault(shapes[i][0], []).append(seconds[i] / shapes[i][1])
    return {
        "phase": "train",
        "steps": len(seconds),
        "warmup": warmup,
        "batch": batch,
        "trained_items": len(items),
        "held_out": len(held_idx),
        "s_per_step": round(median, 4),
        "images_per_s": round(sum(shapes[i][1] for i in steady) / sum(seconds[i] for i in steady), 3),
        "images_per_s_overall": round(sum(n for _, n in shapes) / sum(seconds), 3),  # compiles included
        "compile": compile_mode,
        "first_step_s": round(seconds[0], 3),
        "train_wall_s": round(wall_s, 3),
        "peak_gib": None if peak is None else round(peak, 2),
        "shapes_seen": len(set(shapes)),
        "slow_steps": len(slow),
        "slow_steps_s": round(sum(seconds[i] for i in slow), 3),
        "s_per_image_by_bucket": {k: round(statistics.median(v), 4) for k, v in sorted(per_bucket.items())},
        "memory_plan": [n for n in outcome.notices if n.startswith("memory")],
        "status": outcome.status,
    }


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="full-size random models on CUDA (else tiny, CPU)")
    parser.add_argument("--variant", choices=sorted(QWEN3), default="4b", help="Klein 4B or 9B (with --full-size)")
    parser.add_argument("--images", type=int, default=200, help="images in the album")
    parser.add_argument("--res", type=int, default=None, help="base resolution (default 1024 full-size, 64 tiny)")
    parser.add_argument("--aspects", default=DEFAULT_ASPECTS, help="image aspect ratios, one image each in turn")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image files of the album")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40 full-size, 4 tiny)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="Training Options' compile")
    parser.add_argument("--seed", type=int, default=0, help="the album's pictures and captions")
    parser.add_argument("--workdir", type=Path, default=None, help="album, cache and runs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (a default temp one is removed)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp"), help="where the random Klein file is written")
    parser.add_argument("--jsonl", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.res = args.res or (1024 if args.full_size else 64)
    args.steps = args.steps or (40 if args.full_size else 4)
    if args.images < 1 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--images, --batch and --steps must be at least 1, --warmup at least 0")
    return args


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Callable[[], Any]]:
    """(vae, clip, load the diffusion model): the full-size random ones on CUDA, or the tiny ones on the CPU."""
    if not args.full_size:
        import comfy.sd
        from harness.comfy_test_nodes import FakeClip
        from harness.fixtures import tiny_klein_path
        from klein_lora_lab.trainer_core.model.tiny import TinySpec

        spec = TinySpec()
        return (
            random_vae(),
            FakeClip(spec.context_dim),
            lambda: comfy.sd.load_diffusion_model(str(tiny_klein_path(spec))),
        )
    from train_bench import load_klein

    log(f"building the random Qwen3 text encoder for Klein {args.variant}")
    clip = random_text_encoder(args.variant)
    return random_vae(), clip, lambda: load_klein(args.variant, args.model_dir)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; returns its records (also printed as JSON lines)."""
    args = parse_args(argv)
    root = comfy_path()
    if root is None:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    if args.full_size and not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA GPU")
    import_comfy_inprocess(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not args.full_size
    register_pack()
    import comfy.model_management
    import folder_paths

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="klein-album-bench-"))
    previous = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    folder_paths.set_output_directory(str(workdir / "output"))
    folder_paths.set_input_directory(str(workdir / "input"))
    device = torch.cuda.get_device_name() if args.full_size else "cpu"
    common = {"device": device, "model": f"klein-{args.variant}" if args.full_size else "tiny"}
    records = []
    try:
        aspects = parse_aspects(args.aspects)
        log(f"writing {args.images} {args.format} images around {args.res}² in {workdir}")
        album = write_album(workdir / "input" / ALBUM_FOLDER, args.images, args.res, aspects, args.format, args.seed)
        log(f"album written: {album['album_bytes'] / 2**20:.1f} MiB in {album['album_write_s']:.1f} s")
        vae, clip, load_model = load_models(args)
        encoded, record = encode_phase(args.res, vae, clip)
        records.append(emit({**common, **record, **album, "format": args.format}, args.jsonl))
        del vae, clip
        comfy.model_management.unload_all_models()  # as the Train node does: the encoders leave the GPU
        gc.collect()
        if on_cuda():
            torch.cuda.empty_cache()
        log("loading the diffusion model")
        patcher = load_model()
        record = train_phase(patcher, encoded, args.steps, args.batch, args.warmup, args.compile)
        records.append(emit({**common, **record, "resolution": args.res}, args.jsonl))
    finally:
        folder_paths.set_output_directory(previous[0])
        folder_paths.set_input_directory(previous[1])
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(records))
    return records


def emit(record: dict, jsonl: Path | None) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    if jsonl is not None:
        with jsonl.open("a") as fh:
            fh.write(line + "\n")
    return record


def table(records: Sequence[dict]) -> str:
    """The human summary of one run's records."""
    enc = next(r for r in records if r["phase"] == "encode")
    lines = [
        f"album: {enc['images']} images at {enc['resolution']}², {enc['bucket_count']} buckets "
        + ", ".join(f"{k}: {v}" for k, v in enc["buckets"].items()),
        "| phase | figure |",
        "|---|---|",
        f"| encode (cold cache) | {enc['encode_s']:.1f} s, {enc['encode_s_per_image']:.3f} s/image "
        f"(VAE {enc['vae_s_per_image']:.3f} s/image, text {enc['text_s_per_caption']:.3f} s "
        f"× {enc['texts_encoded']} captions and prompts) |",
        f"| encode (warm cache) | {enc['warm_encode_s']:.1f} s |",
        f"| cache on disk | {enc['cache_bytes'] / 2**20:.1f} MiB, {enc['cache_bytes_per_image'] / 2**10:.0f} KiB/image "
        f"(latents {enc.get('latent_bytes', 0) / 2**20:.1f} MiB, text {enc.get('text_bytes', 0) / 2**20:.1f} MiB) |",
    ]
    for r in records:
        if r["phase"] == "train":
            peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
            lines.append(
                f"| train batch {r['batch']}, compile {r['compile']} | {r['s_per_step']:.3f} s/step (median), "
                f"{r['images_per_s']:.2f} images/s ({r['images_per_s_overall']:.2f} over every step), peak {peak}, "
                f"{r['shapes_seen']} shapes, {r['slow_steps']} slow steps ({r['slow_steps_s']:.0f} s) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
