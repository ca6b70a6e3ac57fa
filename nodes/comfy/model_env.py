"""The MODEL ComfyUI holds, made ready for training: loaded onto the device (never a second copy), out of
inference mode, with `in_training` set, and given back afterwards.

Under ComfyUI's dynamic VRAM (comfy-aimdo: the default of a server on an NVIDIA GPU in ComfyUI 0.29) a MODEL's
patcher is a `ModelPatcherDynamic`. Its "load" puts no weight on the device: each large Linear keeps its host
(memory-mapped, read-only) weight and gets a range of aimdo's virtual VRAM, and ComfyUI's own Linear.forward copies
the weight in for that call only (comfy/ops.py `cast_bias_weight`). Training needs more than that: fp8 compute and
the streamer read `module.weight` on the device, and autograd keeps each frozen weight for the input gradient,
while aimdo may unmap that virtual range as soon as the call returns (comfy-aimdo `vbar_unpin`, then `vbars_free`
under memory pressure). So a run trains on a plain ModelPatcher (`training_patcher`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import comfy.model_management as mm
import torch
from torch import nn

from ...trainer_core.errors import pack_error

LOG = logging.getLogger("klein_lora_lab")


@pack_error
class DynamicVramError(RuntimeError):
    """A MODEL under ComfyUI's dynamic VRAM that cannot be trained on; the message says what to do instead."""


def is_dynamic(model_patcher) -> bool:
    """Whether ComfyUI's dynamic VRAM (comfy-aimdo) manages this patcher's weights."""
    check = getattr(model_patcher, "is_dynamic", None)  # ComfyUI before dynamic VRAM has no such method
    return bool(check()) if check is not None else False


def training_patcher(model_patcher):
    """The patcher a training run loads and trains on; the MODEL received is never changed.

    A plain ModelPatcher: its clone, which shares the weights. A dynamic VRAM patcher: ComfyUI's own non-dynamic
    clone (`clone(disable_dynamic=True)`, what its samplers use for hooks), a plain ModelPatcher over the same file
    loaded again by its loader record (`cached_patcher_init`) with the MODEL's patches, object patches and
    wrappers, so the run loads and streams exactly as with `--disable-dynamic-vram`. The price is reading the
    file once more per run (the plain copy is freed when the run ends).
    """
    if not is_dynamic(model_patcher):
        return model_patcher.clone()
    if getattr(model_patcher, "cached_patcher_init", None) is None:
        raise DynamicVramError(
            "This MODEL runs under ComfyUI's dynamic VRAM (the default on NVIDIA GPUs), which copies each weight "
            "to the GPU only for the call that uses it; training needs the weights loaded, and this MODEL's loader "
            "kept no record of its file to load it again that way. Fix: load it with 'Load Diffusion Model', or "
            "start ComfyUI with --disable-dynamic-vram."
        )
    LOG.info("Klein LoRA Lab: the MODEL uses ComfyUI's dynamic VRAM; training loads its file again as a plain model")
    return model_patcher.clone(disable_dynamic=True)


@contextmanager
def loaded_for_training(model_patcher) -> Iterator[tuple[nn.Module, torch.device]]:
    """Unload every other model, load this MODEL fully onto its device and yield (diffusion model, device).

    The diffusion model is the very module ComfyUI loaded (`model_patcher.model.diffusion_model`): no clone of
    the weights, no deepcopy. On exit the device cache is emptied; the model stays loaded for sampling next.
    A dynamic VRAM patcher is refused (its weights would not be on the device): pass `training_patcher(MODEL)`.
    """
    if is_dynamic(model_patcher):
        raise DynamicVramError(
            "loaded_for_training got a dynamic VRAM patcher, whose weights stay off the device. "
            "Fix: pass training_patcher(model_patcher)."
        )
    mm.unload_all_models()
    mm.soft_empty_cache()
    mm.load_models_gpu([model_patcher], force_full_load=True)
    diffusion_model = model_patcher.model.diffusion_model
    normalize_inference_tensors(diffusion_model)
    try:
        yield diffusion_model, model_patcher.load_device
    finally:
        mm.cleanup_models_gc()
        mm.soft_empty_cache(force=True)


def normalize_inference_tensors(module: nn.Module) -> int:
    """Turn parameters/buffers created under inference mode into normal tensors with the same values.

    ComfyUI loads models while executing a node, i.e. under `torch.inference_mode()`, and autograd refuses to
    save inference tensors for backward (every frozen Linear weight is saved to compute the input gradient).
    Each tensor is cloned once and swapped in place of the old one, so the model never exists twice (peak
    overhead: one tensor); values, dtypes and devices are unchanged and the tensors keep working for inference.
    Returns how many tensors were converted.
    """
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    converted += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    converted += 1
    return converted


def reload_model(model_patcher, streamer: PartialLoadStreamer | None = None) -> None:
    """Make sure the MODEL is back on its device (a VAE decode between steps may have moved it off); with a
    streamer that streams, as the run's memory plan has it (its streamed weights left in host memory)."""
    if streamer is not None and streamer.streamed:
        streamer.reload()
        return
    mm.load_models_gpu([model_patcher], force_full_load=True)


class PartialLoadStreamer:
    """Base weights left in host memory through ComfyUI's own partial loading (trainer_core's WeightStreamer).

    `ModelPatcher.partially_unload(offload_device, nbytes)` moves whole modules to the offload device, smallest
    first (ComfyUI's order), until at least `nbytes` went, and sets their `comfy_cast_weights`: every call of such
    a module then casts its weight to the input's device and dtype (comfy/ops.py cast_bias_weight), so each step
    copies the streamed weights over again. `restore` loads the MODEL fully again, as `loaded_for_training` had it.

    While weights stream, ComfyUI's async offload streams are off (`NUM_STREAMS` 0): with them a cast weight in
    the compute dtype is a view of a cast buffer the next module's cast overwrites, and autograd saves that weight
    for the input gradient of a recomputed block. Without them every cast is a tensor of its own.

    A training run never gets a dynamic VRAM patcher (`training_patcher` swaps it for a plain one); should one come
    here anyway it pages weights on its own, and an offload device other than the host (--highvram, --gpu-only)
    keeps weights on the GPU: nothing is streamed there (streamable 0), and the plan says what to lower instead.
    """

    def __init__(self, model_patcher, on_stream: Callable[[], None] | None = None) -> None:
        self.patcher = model_patcher
        self.on_stream = on_stream  # told when weights start streaming (the blocks then run uncompiled)
        self.streamed = 0
        self._streams: int | None = None  # ComfyUI's NUM_STREAMS while weights stream, restored by `restore`

    def streamable(self) -> int:
        """Bytes of the loaded modules whose weights ComfyUI can cast per call (comfy_cast_weights)."""
        # Dynamic VRAM pages weights itself; an offload device that is not the host (--highvram, --gpu-only)
        # would keep "streamed" weights on the GPU.
        if is_dynamic(self.patcher) or torch.device(self.patcher.offload_device).type != "cpu":
            return 0
        model = self.patcher.model
        return sum(
            mm.module_size(m)
            for m in model.modules()
            if hasattr(m, "comfy_cast_weights") and getattr(m, "comfy_patched_weights", False)
        )

    def stream(self, nbytes: int) -> int:
        """Leave at least `nbytes` of base weights in host memory in all; returns the bytes left there."""
        need = nbytes - self.streamed
        if need <= 0:
            return self.streamed
        if self._streams is None:
            self._streams, mm.NUM_STREAMS = mm.NUM_STREAMS, 0
            if self.on_stream is not None:
                self.on_stream()
        self.streamed += self.patcher.partially_unload(self.patcher.offload_device, need)
        mm.soft_empty_cache()
        LOG.info("Klein LoRA Lab: %.2f GiB of the base weights stream from host memory", self.streamed / 2**30)
        return self.streamed

    def reload(self) -> None:
        """After something else moved the MODEL (a VAE decode): back on the device with the same bytes streamed."""
        loaded = any(m is self.patcher for m in mm.loaded_models())
        if loaded and self.patcher.loaded_size() >= self.patcher.model_size() - self.streamed:
            return  # nothing moved it: no round trip through a full load
        target, self.streamed = self.streamed, 0
        mm.load_models_gpu([self.patcher], force_full_load=True)
        self.stream(target)

    def restore(self) -> None:
        """Load the MODEL fully again and give ComfyUI its async offload streams back."""
        try:
            if self.streamed:
                try:
                    mm.load_models_gpu([self.patcher], force_full_load=True)
                except torch.OutOfMemoryError:
                    # ComfyUI detached the model on the failed load: it loads again when next used.
                    LOG.warning("Klein LoRA Lab: the MODEL did not fit fully after training; ComfyUI reloads it")
                self.streamed = 0
        finally:
            if self._streams is not None:
                mm.NUM_STREAMS, self._streams = self._streams, None


@contextmanager
def streamed_weights(model_patcher, on_stream: Callable[[], None] | None = None) -> Iterator[PartialLoadStreamer]:
    """A streamer for a training run on the loaded MODEL; on exit the MODEL is fully loaded again."""
    streamer = PartialLoadStreamer(model_patcher, on_stream)
    try:
        yield streamer
    finally:
        streamer.restore()


@contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on and `in_training` set, both restored afterwards whatever happens."""
    previous = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        mm.in_training = True
        try:
            yield
        finally:
            mm.in_training = previous
