"""Seeded, disk-cached test fixtures: tiny Klein diffusion models and matching text conditioning.

Files live under `<repo>/.cache/fixtures/` (gitignored) and are keyed by the spec, the seed and a hash of the
code that generates them, so a change to `trainer_core/model/tiny.py` or `klein.py` produces a new file instead of a
stale one. Writes are atomic (temp file + rename), so parallel test processes never read half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .comfy_env import PACK_ROOT

CACHE_ROOT = Path(os.environ.get("KLEIN_LAB_CACHE", PACK_ROOT / ".cache")) / "fixtures"

# The generating code: its content is part of every cache key.
_TINY_SOURCES = (PACK_ROOT / "trainer_core" / "model" / "tiny.py", PACK_ROOT / "trainer_core" / "model" / "klein.py")


def source_hash(paths: tuple[Path, ...]) -> str:
    """Short hash of the files that generate a fixture (a code change invalidates the cache)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cached_file(name: str, build: Callable[[Path], None]) -> Path:
    """`CACHE_ROOT/name`, built by `build(tmp_path)` the first time and renamed into place atomically."""
    target = CACHE_ROOT / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _spec_key(spec) -> str:
    fields = asdict(spec)
    return "h{hidden}-d{double_blocks}-s{single_blocks}-c{context_dim}{z}".format(
        z="-z" if fields.pop("zero_final") else "", **fields
    )


def tiny_klein_path(spec=None, seed: int = 0) -> Path:
    """Path of a safetensors file holding `tiny_klein_state_dict(spec, seed)`; ComfyUI's UNETLoader sees flux2."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict
    from safetensors.torch import save_file

    spec = TinySpec() if spec is None else spec
    name = f"tiny_klein-{_spec_key(spec)}-seed{seed}-{source_hash(_TINY_SOURCES)}.safetensors"

    def build(path: Path) -> None:
        save_file(tiny_klein_state_dict(spec, seed), str(path), metadata={"klein_lab_fixture": name})

    return cached_file(name, build)


def tiny_conditioning(spec=None, tokens: int = 8, batch: int = 1, seed: int = 0):
    """Text conditioning [batch, tokens, context_dim] matching `spec`'s context width (stands in for Qwen3)."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from klein_lora_lab.trainer_core.model.tiny import tiny_conditioning as make

    return make(TinySpec() if spec is None else spec, tokens=tokens, batch=batch, seed=seed)


def tiny_conditioning_path(spec=None, tokens: int = 8, batch: int = 1, seed: int = 0) -> Path:
    """`tiny_conditioning(...)` saved as safetensors under the key `cond` (for the server-side loader node)."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from safetensors.torch import save_file

    spec = TinySpec() if spec is None else spec
    name = f"cond-c{spec.context_dim}-t{tokens}-b{batch}-seed{seed}-{source_hash(_TINY_SOURCES)}.safetensors"

    def build(path: Path) -> None:
        save_file({"cond": tiny_conditioning(spec, tokens, batch, seed).contiguous()}, str(path))

    return cached_file(name, build)


def tiny_distilled_path(spec=None, seed: int = 0) -> Path:
    """A 'distilled' flavour of the tiny Klein: the same module names and shapes as `tiny_klein_path(spec, seed)`,
    its weights moved by a seeded 5% of each tensor's spread (a distilled Klein is Base fine-tuned for 4 steps:
    one layout, other weights). ComfyUI's UNETLoader sees flux2."""
    import torch
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict
    from safetensors.torch import save_file

    spec = TinySpec() if spec is None else spec
    name = f"tiny_klein_distilled-{_spec_key(spec)}-seed{seed}-{source_hash(_TINY_SOURCES)}.safetensors"

    def build(path: Path) -> None:
        gen = torch.Generator().manual_seed(1000 + seed)
        state = tiny_klein_state_dict(spec, seed)
        moved = {}
        for key, value in sorted(state.items()):
            spread = value.float().std() if value.numel() > 1 else value.float().abs()
            noise = torch.randn(value.shape, generator=gen) * 0.05 * spread
            moved[key] = (value.float() + noise).to(value.dtype).contiguous()
        save_file(moved, str(path), metadata={"klein_lab_fixture": name})

    return cached_file(name, build)
