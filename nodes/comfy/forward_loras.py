"""Forward-time LoRAs inside ComfyUI's own sampling: the glue between `AdapterStack` and a ComfyUI MODEL.

How it works: the loader/mixer nodes clone the MODEL they receive and register one DIFFUSION_MODEL wrapper
(`comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`, key `WRAPPER_KEY`) on the clone. ComfyUI merges a
patcher's wrappers into `transformer_options` when it samples, and Flux's `forward` runs its wrappers around
`_forward`. For the duration of each diffusion-model call the wrapper sets an instance-level `forward` on every
target Linear that returns the Linear's own result plus the stacked LoRAs, and restores exactly what was there
in `finally`. So:

* the base weights are never patched: the clone carries no weight patches, `load_models_gpu` finds the same
  weights loaded (same `patches_uuid`) and returns without touching them; a new strength, checkpoint or block
  vector is a new small wrapper object, not a re-patch;
* ComfyUI's own forward runs (its fp8/manual-cast Linear, lowvram offload, attention patches and other
  extensions keep working); for such Linears the delta is computed in the activations' dtype and added to the
  Linear's output;
* the model received by a node is never touched (the patch lives only inside calls made through the clone),
  and several LoRAs stack: a clone of a model that already carries our wrapper gets one wrapper holding both.

LoRA tensors are read once per file (lora_cache.py: cached by path, mtime and size, within a byte budget, and
released when ComfyUI frees memory) straight onto the model's load device, and cast at most once per compute
dtype; all LoRAs of a module are fused into one (down, up, scale). Inside a
sampler run (an OUTER_SAMPLE wrapper registered with the DIFFUSION_MODEL one) each plain target Linear is merged
once into a separate tensor W + s·U·D while the device's free memory allows (`MergeCache`), so later steps cost
what merged weights cost; the tensors are freed when the run ends. Otherwise, per call and target Linear, the
cost is either one pass over its output (y + s·(x Dᵀ) Uᵀ, fused into one addmm) or, for a plain Linear fed more
tokens than it has input features, one pass over its weight (F.linear(x, W + s·U D)); see `use_weight_side`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...trainer_core.lora.adapters import AdapterStack, add_lora, merged_weight
from ...trainer_core.model.block_weights import (
    PRESETS,
    block_of,
    check_strength,
    module_strengths,
    parse_block_vector,
)
from ...trainer_core.model.klein import KleinShape, read_shape
from ...trainer_core.model.variants import block_layout, block_names
from .lora_cache import LORA_FILES, LoadedLora, load_lora_cached
from .paths import lora_path

LOG = logging.getLogger("klein_lora_lab")

WRAPPER_KEY = "klein_lora_lab.forward_loras"


# ------------------------------------------------------------------------------------------------ the wrapper


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a forward-time stack: its weights, strength and per-module multipliers (block weights)."""

    label: str
    lora: LoadedLora
    strength: float
    module_strength: Mapping[str, float] | None = None


# Where the LoRA is added, chosen per call: into the Linear's output (y + s·(x Dᵀ) Uᵀ: one extra pass over the
# output [tokens, out]) or into a temporary weight (F.linear(x, W + s·U D): one pass over the weight [out, in]).
# The weight side wins when tokens > in_features (Klein 4B at 1024² with CFG: 9216 tokens vs 3072), the output
# side on small images. The weight side needs a plain, fully loaded Linear whose weight is in the compute
# dtype; fp8 / manual-cast / offloaded Linears always take the output side through ComfyUI's own forward.
WEIGHT_SIDE_TOKENS_PER_IN = 1.0


def use_weight_side(tokens: int, in_features: int) -> bool:
    return tokens > WEIGHT_SIDE_TOKENS_PER_IN * in_features


def _plain_linear(module: nn.Module, x: Tensor) -> bool:
    """True when ComfyUI's forward of this Linear is exactly F.linear(x, weight, bias) (no cast, no patch)."""
    weight = getattr(module, "weight", None)
    return (
        type(weight) is nn.Parameter
        and weight.dtype == x.dtype
        and weight.device == x.device
        and not getattr(module, "comfy_cast_weights", False)
        and not getattr(module, "weight_function", None)
        and not getattr(module, "bias_function", None)
    )


class MergeCache:
    """Merged target weights (W + s·U·D) kept for the length of one sampling run, within a memory budget.

    Without it every diffusion-model call rebuilds W + s·U·D (two extra passes over each weight) or adds the LoRA
    to the output (an extra pass over the activations): a few percent of a sampling step. With it the first call
    of a run merges each target Linear once into a separate tensor (the base weights stay untouched) and every
    later call is a plain F.linear. The cache lives inside ComfyUI's OUTER_SAMPLE wrapper only, so its memory is
    back before VAE decoding or the next model load; it stops growing when the device's free memory would fall
    under `MERGE_RESERVE` (activations of the sampler), and Linears beyond the budget use the per-call path.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.tensors: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def merged(self, name: str, module: nn.Module, lora: tuple[Tensor | None, Tensor, float]) -> Tensor | None:
        """W + s·U·D of `module` (cached), or None when it does not fit the budget."""
        weight: Tensor = module.weight
        key = (name, weight.device, weight.dtype)
        cached = self.tensors.get(key)
        if cached is not None:
            return cached
        size = weight.numel() * weight.element_size()
        if size > self.budget:
            return None
        self.budget -= size
        self.tensors[key] = merged_weight(weight, lora).detach()
        return self.tensors[key]


# Free device memory left to the sampler when merged weights are cached: the larger of 4 GiB and a fifth of the
# device (activations, ComfyUI's batching of cond/uncond, other extensions).
MERGE_RESERVE_MIN = 4 << 30
MERGE_RESERVE_SHARE = 0.2


def merge_budget(device: torch.device) -> int:
    """Bytes of merged weights that may be cached on `device` for one sampling run (0 = none)."""
    free = comfy.model_management.get_free_memory(device)
    total = comfy.model_management.get_total_memory(device)
    return max(0, int(free - max(MERGE_RESERVE_MIN, MERGE_RESERVE_SHARE * total)))


def _lora_forward(
    module: nn.Module,
    inner: Callable[..., Tensor],
    own: bool,
    name: str,
    lora: tuple[Tensor | None, Tensor, float],
    cache: MergeCache | None,
    *args,
    **kwargs,
) -> Tensor:
    """A target Linear's forward during one diffusion-model call: its own output plus the stacked LoRAs.

    lora = (down [r, in], up [out, r], scale), or (None, ΔW [out, in], scale) for a dense delta (LoKr, LoHa,
    DoRA, diff); inner = the forward it had before (ComfyUI's, or another extension's instance forward: `own` is
    False then and the output side is always used); cache = the merged weights of the current sampling run (None
    outside a sampler run).
    """
    down, up, scale = lora
    x = args[0]
    if own and not kwargs and len(args) == 1 and _plain_linear(module, x):
        merged = cache.merged(name, module, lora) if cache is not None else None
        # a dense ΔW costs a full [out, in] pass either way: merging it (one add) beats a second matmul
        if merged is None and (down is None or use_weight_side(x.numel() // x.shape[-1], x.shape[-1])):
            merged = merged_weight(module.weight, lora)  # W + s·U·D for this call only
        if merged is not None:
            comfy.ops.run_every_op()  # what ComfyUI's Linear.forward does first (interruption checks)
            return F.linear(x, merged, module.bias)
    return add_lora(x, inner(*args, **kwargs), down, up, scale)


@dataclass(eq=False)
class ForwardLoras:
    """The DIFFUSION_MODEL wrapper: applies a stack of LoRAs at forward time for each diffusion-model call."""

    specs: tuple[LoraSpec, ...]
    _stacks: dict[tuple[torch.device, torch.dtype], AdapterStack] = field(default_factory=dict, repr=False)
    _fused: dict[tuple[torch.device, torch.dtype], dict[str, tuple[Tensor | None, Tensor, float]]] = field(
        default_factory=dict, repr=False
    )
    _cache: MergeCache | None = field(default=None, repr=False)
    _sampling: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        LORA_FILES.hold(self)  # its fused tensors go when ComfyUI frees memory (rebuilt at the next call)

    def release_tensors(self) -> None:
        self._stacks.clear()
        self._fused.clear()

    def stack(self, device: torch.device, dtype: torch.dtype, model: nn.Module | None = None) -> AdapterStack:
        """The AdapterStack on (device, dtype), built once per wrapper (tensors come from the file cache; DoRA
        modules read `model`'s weights)."""
        key = (torch.device(device), dtype)
        if key not in self._stacks:
            stack = AdapterStack()
            weight_of = None if model is None else (lambda name: model.get_submodule(name).weight)
            for i, spec in enumerate(self.specs):
                placed = spec.lora.placed(device, dtype, weight_of)
                stack.set_lora(f"{i}:{spec.label}", placed, spec.strength, spec.module_strength)
            self._stacks[key] = stack
            # per module all LoRAs as one (down, up, scale): one thin matmul pair per Linear, however many LoRAs
            self._fused[key] = {name: stack.fused(name) for name in stack.names()}
        return self._stacks[key]

    def __call__(self, executor, *args, **kwargs):
        model: nn.Module = executor.class_obj
        x: Tensor = args[0]  # [b, 128, h, w] in the compute dtype (fp8 weights compute in bf16/fp32)
        self.stack(x.device, x.dtype, model)
        if self._sampling and self._cache is None:  # first call of a sampler run: size the merge budget now
            self._cache = MergeCache(merge_budget(x.device))
        patched: list[tuple[nn.Module, Callable | None]] = []
        try:
            for name, lora in self._fused[(torch.device(x.device), x.dtype)].items():
                module = model.get_submodule(name)
                previous = module.__dict__.get("forward")  # an instance forward another extension set, if any
                inner = previous if previous is not None else module.forward
                module.forward = partial(_lora_forward, module, inner, previous is None, name, lora, self._cache)
                patched.append((module, previous))
            return executor(*args, **kwargs)
        finally:
            for module, previous in reversed(patched):  # restore exactly what was there
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def sampling_run(self, executor, *args, **kwargs):
        """The OUTER_SAMPLE wrapper: merged weights may be cached during one sampler run and are freed after it."""
        self._sampling, self._cache = True, None
        try:
            return executor(*args, **kwargs)
        finally:
            self._sampling, self._cache = False, None

    def to(self, *args, **kwargs) -> ForwardLoras:
        """ComfyUI calls .to(device) / .to(model dtype) on wrappers; tensors are placed per compute dtype instead
        (the model dtype may be fp8, which a LoRA must not be cast to)."""
        return self


@dataclass(frozen=True, eq=False)
class SamplingRun:
    """OUTER_SAMPLE wrapper object (ComfyUI calls .to() on wrappers, which a bound method lacks)."""

    loras: ForwardLoras

    def __call__(self, executor, *args, **kwargs):
        return self.loras.sampling_run(executor, *args, **kwargs)

    def to(self, *args, **kwargs) -> SamplingRun:
        return self


def forward_loras_of(model) -> ForwardLoras | None:
    """Our wrapper on a ModelPatcher, if it has one."""
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    return wrappers[-1] if wrappers else None


def with_forward_loras(model, specs: Sequence[LoraSpec]):
    """A clone of `model` whose diffusion model applies `specs` (after any LoRAs `model` already carries)."""
    clone = model.clone()
    existing = forward_loras_of(model)
    combined = ForwardLoras((existing.specs if existing else ()) + tuple(specs))
    wrappers = comfy.patcher_extension.WrappersMP
    clone.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY)
    clone.remove_wrappers_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY)
    clone.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, combined)
    clone.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, SamplingRun(combined))
    return clone


# ------------------------------------------------------------------------------------------------ node glue


@dataclass(frozen=True)
class StackItem:
    """One LoRA as the nodes describe it (what the KLEIN_LORA_STACK socket carries): file, strength, blocks."""

    lora_name: str
    strength: float
    preset: str = "all"
    group_strengths: tuple[tuple[str, float], ...] = ()
    block_vector: str = ""
    global_strength: float = 1.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown block preset '{self.preset}': choose one of {', '.join(PRESETS)}.")


def model_shape(model) -> KleinShape:
    return read_shape(model.model.diffusion_model)


def spec_for(item: StackItem, shape: KleinShape, device: torch.device) -> tuple[LoraSpec, str]:
    """Read the item's file for this model and compute its block weights; returns the spec and a report line."""
    check_strength(item.strength, f"strength of {item.lora_name}")  # NaN passes the widget's min/max check
    loaded = load_lora_cached(lora_path(item.lora_name), shape, device)
    vector = parse_block_vector(item.block_vector)
    try:
        mults = module_strengths(
            loaded.weights, shape, item.preset, dict(item.group_strengths), vector, item.global_strength
        )
    except ValueError as err:
        raise ValueError(f"{item.lora_name}: {err}") from err
    line = f"{item.lora_name} @ {item.strength:g} [{item.preset}]: {loaded.read.report()}"
    if loaded.read.unmatched:
        LOG.warning("Klein LoRA Lab: %s: keys not loaded: %s", item.lora_name, ", ".join(loaded.read.unmatched))
    return LoraSpec(item.lora_name, loaded, item.strength, mults), line


def apply_items(model, items: Sequence[StackItem]):
    """Clone `model` with `items` applied at forward time; returns (clone, report text for the node)."""
    shape = model_shape(model)
    device = model.load_device  # where the model computes; LoRA tensors are read straight onto it
    specs, lines = [], []
    for item in items:
        if item.strength == 0.0:
            lines.append(f"{item.lora_name} @ 0: skipped")
            continue
        spec, line = spec_for(item, shape, device)
        specs.append(spec)
        lines.append(line)
    return with_forward_loras(model, specs), "\n".join(lines) or "no LoRA applied"


def loaded_summary(model, patched) -> dict[str, Any]:
    """What the LoRAs that `patched` adds over `model` loaded, for the node in the page (the block editor): the
    model's block layout and, per LoRA, its modules, the blocks it touches (model order) and its file format."""
    shape = model_shape(model)
    before = forward_loras_of(model)
    after = forward_loras_of(patched)
    added = (after.specs if after else ())[len(before.specs) if before else 0 :]
    order = {name: i for i, name in enumerate(block_names(shape))}
    loaded = []
    for spec in added:
        read = spec.lora.read
        blocks = {block_of(name) for name in read.weights}
        loaded.append(
            {
                "lora": spec.label,
                "strength": spec.strength,
                "modules": len(read.weights),
                "blocks": sorted((b for b in blocks if b is not None), key=lambda b: order.get(b, len(order))),
                "global_modules": sum(block_of(name) is None for name in read.weights),
                "format": read.source_format,
                "adapter": read.adapter_types,
                "not_loaded": len(read.unmatched),
            }
        )
    return {"layout": block_layout(shape.double_blocks, shape.single_blocks), "loaded": loaded}
