"""LoRA files read for the forward-time adapters, kept for the next frame or prompt, within a byte budget and
answering to ComfyUI's memory management.

A file is read once per (path, mtime, size, model shape, device): scrubbing back to a checkpoint or changing a
scale reuses its tensors. Each entry holds the tensors as read (on the model's compute device) and one copy per
compute dtype. The cache is bounded by bytes (`LORA_CACHE_BYTES`, oldest entry dropped first) and drops its
device tensors whenever ComfyUI frees memory on that device (see `install_memory_hook`); a LoRA still in use
(a MODEL output cached by ComfyUI carries it) reads its file again the next time it runs.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import comfy.model_management as mm
import torch
from torch import Tensor

from ...trainer_core.lora.adapter_math import DenseAdapter, place
from ...trainer_core.lora.adapters import Adapter, DenseDelta, LoraWeights
from ...trainer_core.lora.lora_formats import FileAdapter, LoraRead, read_lora_file
from ...trainer_core.model.klein import KleinShape

LOG = logging.getLogger("klein_lora_lab")
# Several full-size LoRAs (a rank-32 Klein 4B attention LoRA is ~0.1 GiB in bf16); a longer scrub re-reads the oldest.
LORA_CACHE_BYTES = 2 << 30


def _tensors(adapter: FileAdapter | Adapter) -> list[Tensor]:
    if isinstance(adapter, LoraWeights):
        return [adapter.down, adapter.up]
    if isinstance(adapter, DenseDelta):
        return [adapter.delta]
    return [tensor for part in adapter.parts for tensor in part.tensors.values()]


def _nbytes(groups: list[dict[str, FileAdapter | Adapter]]) -> int:
    """Bytes of the tensors of several adapter dicts, each storage once (a dtype copy in the dtype the file was
    read in is the same tensor)."""
    seen: set[int] = set()
    total = 0
    for adapters in groups:
        for adapter in adapters.values():
            for t in _tensors(adapter):
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
    return total


def same_device(a: torch.device | str, b: torch.device | str | None) -> bool:
    """True when `a` is on device `b` (None = every device; 'cuda' matches 'cuda:0' and the other way round)."""
    if b is None:
        return True
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class LoadedLora:
    """A LoRA file read for one model shape onto one device, with a copy per compute dtype."""

    def __init__(
        self, path: Path, shape: KleinShape, device: torch.device | str, on_grow: Callable[[LoadedLora], None]
    ):
        self.path, self.shape, self.device = path, shape, torch.device(device)
        self._on_grow = on_grow
        self._read: LoraRead | None = None
        self._placed: dict[tuple[torch.device, torch.dtype], dict[str, Adapter]] = {}

    @property
    def read(self) -> LoraRead:
        """The file as read (read again after a release)."""
        if self._read is None:
            self._read = read_lora_file(self.path, self.shape, self.device)
        return self._read

    @property
    def weights(self) -> dict[str, FileAdapter]:
        return self.read.weights

    def placed(
        self, device: torch.device, dtype: torch.dtype, weight_of: Callable[[str], Tensor] | None = None
    ) -> dict[str, Adapter]:
        """The adapters on `device` in `dtype` (moved, or their dense ΔW built, the first time only).

        DoRA modules depend on the model's weight (`weight_of(module name)`), so they are built per call and
        cached by the caller (one wrapper = one model), never in this file cache."""
        key = (torch.device(device), dtype)
        placed = self._placed.get(key)
        if placed is None:
            placed = {name: place(w, device, dtype) for name, w in self.weights.items() if not _needs_base(w)}
            self._placed[key] = placed
            self._on_grow(self)
        based = [name for name, w in self.weights.items() if _needs_base(w)]
        if not based:
            return placed
        if weight_of is None:
            raise ValueError(f"{self.path.name}: its DoRA modules need the model's weights to be applied.")
        return {**placed, **{n: place(self.weights[n], device, dtype, weight_of(n)) for n in based}}

    def nbytes(self) -> int:
        """Bytes held: the tensors as read and every dtype copy."""
        read = [self._read.weights] if self._read is not None else []
        return _nbytes(read + list(self._placed.values()))

    def release(self) -> None:
        """Drop every tensor; the next use reads the file again."""
        self._read, self._placed = None, {}


def _needs_base(adapter: FileAdapter) -> bool:
    return isinstance(adapter, DenseAdapter) and adapter.needs_base


class TensorHolder(Protocol):
    def release_tensors(self) -> None: ...


class LoraCache:
    """LoadedLora entries by (path, mtime, size, shape, device), least recently used first, within `max_bytes`."""

    def __init__(self, max_bytes: int = LORA_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int, int, KleinShape, str], LoadedLora] = OrderedDict()
        # Objects built from entries' tensors (the forward-time wrappers' fused stacks): released with them.
        self._holders: weakref.WeakSet[TensorHolder] = weakref.WeakSet()

    def get(self, path: str | Path, shape: KleinShape, device: torch.device | str = "cpu") -> LoadedLora:
        """The entry of this file for a model of `shape` on `device`: read now, or the cached one."""
        path = Path(path)
        stat = os.stat(path)
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, shape, str(torch.device(device)))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        loaded = LoadedLora(path, shape, device, self._grew)
        _ = loaded.read  # read now: a broken file fails the node that asked for it, not a later frame
        self._entries[key] = loaded
        self.trim()
        return loaded

    def nbytes(self) -> int:
        return sum(entry.nbytes() for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _grew(self, entry: LoadedLora) -> None:
        """An entry placed a new dtype copy: it is in use now, so the older entries go if the budget is passed."""
        for key, value in self._entries.items():
            if value is entry:
                self._entries.move_to_end(key)
                break
        self.trim()

    def trim(self) -> None:
        """Drop the least recently used entries until the cache fits its budget (the newest always stays)."""
        while len(self._entries) > 1 and self.nbytes() > self.max_bytes:
            _key, entry = self._entries.popitem(last=False)
            entry.release()

    def hold(self, holder: TensorHolder) -> None:
        """Register an object that keeps tensors made from entries, so `release_device` reaches them too."""
        self._holders.add(holder)

    def release_device(self, device: torch.device | str | None) -> int:
        """Drop every entry on `device` (None = all) and what holders built from them; returns the bytes freed."""
        freed = 0
        for key, entry in list(self._entries.items()):
            if same_device(entry.device, device):
                freed += entry.nbytes()
                entry.release()
                del self._entries[key]
        for holder in list(self._holders):
            holder.release_tensors()
        return freed

    def clear(self) -> None:
        self.release_device(None)


LORA_FILES = LoraCache()


def load_lora_cached(path: str | Path, shape: KleinShape, device: torch.device | str = "cpu") -> LoadedLora:
    """Read a LoRA file onto `device` (the model's compute device: a new checkpoint is read straight onto the
    GPU) for a model of `shape`; the same file (path, mtime, size) is read once while it stays cached."""
    return LORA_FILES.get(path, shape, device)


# ------------------------------------------------------------------------------------------------ memory


def _releasing_free_memory(original: Callable) -> Callable:
    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        # ComfyUI is short of memory on `device` (or unloads everything: memory_required 1e30): our LoRA tensors
        # go first, before it unloads models, and its own cache emptying then returns them to the driver.
        if device is None or memory_required > mm.get_free_memory(device):
            freed = LORA_FILES.release_device(device)
            if freed:
                LOG.debug("Klein LoRA Lab: released %.1f MiB of LoRA tensors on %s", freed / 2**20, device)
        return original(memory_required, device, *args, **kwargs)

    free_memory.klein_lab_original = original
    return free_memory


def install_memory_hook() -> None:
    """Make the cache answer to ComfyUI's memory management (idempotent; the extension calls it on load).

    ComfyUI 0.29 has no listener for memory events, so this wraps `comfy.model_management.free_memory`. Every
    path that frees device memory goes through it by its module-level name: `unload_all_models` (the /free
    endpoint's "unload models", the recovery after an out-of-memory error, --disable-smart-memory) and
    `load_models_gpu` making room for the next model. The per-model alternative (a ModelPatcher ON_DETACH
    callback) fires every time a clone with other LoRAs replaces the loaded one, i.e. on every scrub frame, and
    never when the model carrying the callback was already garbage-collected, so it would both empty the cache
    needlessly and miss real unloads.
    """
    if getattr(mm.free_memory, "klein_lab_original", None) is None:
        mm.free_memory = _releasing_free_memory(mm.free_memory)
