"""Test-only ComfyUI nodes: copied into a test server's temp custom_nodes, never shipped with the pack.

There is no tiny text encoder (Qwen3's config is fixed), so tests either feed CONDITIONING from a safetensors
file holding `cond` [batch, tokens, context_dim] (KleinLabTestConditioning), or use `FakeClip`: ComfyUI's CLIP
interface (tokenize -> encode_from_tokens_scheduled) over a deterministic stand-in encoder whose output depends
on the text. `KleinLabTestCLIPLoader` returns one, so a workflow's `CLIPLoader` can be swapped for it and
`CLIPTextEncode` and the pack's prompt widgets run unchanged. In-process tests import `FakeClip` from here.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

TINY_CONTEXT_DIM = 64  # TinySpec().context_dim


class FakeClip:
    """ComfyUI's CLIP interface over a deterministic stand-in encoder; records the texts it encoded.

    The conditioning of a text is seeded by its characters: the same text always gives the same tensor
    [1, len(text), context_dim], different texts give different ones."""

    def __init__(self, context_dim: int = TINY_CONTEXT_DIM) -> None:
        self.cond_stage_model = torch.nn.Linear(4, context_dim, bias=False)
        torch.nn.init.constant_(self.cond_stage_model.weight, 0.01)
        self.context_dim = context_dim
        self.encoded: list[str] = []

    def tokenize(self, text: str):
        return {"qwen3_4b": [[(float(ord(c)), 1.0) for c in text] or [(0.0, 1.0)]]}

    def encode_from_tokens_scheduled(self, tokens, **_kwargs):
        codes = torch.tensor([t for t, _ in tokens["qwen3_4b"][0]])
        self.encoded.append("".join(chr(int(c)) for c in codes if c > 0))
        gen = torch.Generator().manual_seed(int((codes * torch.arange(1, len(codes) + 1)).sum().item()) % (2**31))
        cond = torch.randn(1, len(codes), self.context_dim, generator=gen)
        return [[cond, {"pooled_output": None}]]

    def clone(self) -> FakeClip:
        return self


class KleinLabTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "safetensors file with key 'cond'."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, path: str):
        cond = load_file(path)["cond"]
        return ([[cond, {}]],)


class KleinLabTestCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "context_dim": ("INT", {"default": TINY_CONTEXT_DIM, "min": 1, "max": 16384, "tooltip": "Width."})
            }
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, context_dim: int):
        return (FakeClip(context_dim),)


class KleinLabTestInjectOOM:
    """Passes MODEL through and makes the pack's trainer raise torch.OutOfMemoryError at its `at_call`-th forward
    from now on (once; the trainer's own forward is restored when it fires)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Passed through unchanged."}),
                "at_call": ("INT", {"default": 3, "min": 1, "max": 1000, "tooltip": "Forward call that fails."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "inject"
    CATEGORY = "testing"

    def inject(self, model, at_call: int):
        import sys

        # Every loaded copy of the trainer module (the pack may be imported under more than one name).
        trainers = {id(m): m for n, m in list(sys.modules.items()) if n.endswith("trainer_core.training.trainer") and m}
        reals = {key: m.klein_forward for key, m in trainers.items()}
        calls = [0]

        def restore() -> None:
            for key, m in trainers.items():
                m.klein_forward = reals[key]

        def failing(real):
            def forward(*args, **kwargs):
                calls[0] += 1
                if calls[0] >= at_call:
                    restore()
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")
                return real(*args, **kwargs)

            return forward

        for key, m in trainers.items():
            m.klein_forward = failing(reals[key])
        return (model,)


class KleinLabTestCancelAtCheckpoint:
    """Passes MODEL through and presses Cancel (ComfyUI's interrupt flag, as POST /interrupt sets it) right after
    the pack saves checkpoint `step` of run `run_name` (once; the pack's callback is restored when it fires). A
    test that cancels there waits on that record, never on time: the Cancel lands at the same step under any load."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Passed through unchanged."}),
                "run_name": ("STRING", {"default": "", "tooltip": "Run folder name whose checkpoint cancels."}),
                "step": ("INT", {"default": 1, "min": 1, "max": 100000, "tooltip": "Checkpoint step that cancels."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "arm"
    CATEGORY = "testing"

    def arm(self, model, run_name: str, step: int):
        import sys

        import comfy.model_management as mm

        # Every loaded copy of the pack's ComfyUI training module (the pack may be imported under more than one name).
        classes = {
            id(m.ComfyCallbacks): m.ComfyCallbacks
            for n, m in list(sys.modules.items())
            if n.endswith("nodes.comfy.training") and m is not None and hasattr(m, "ComfyCallbacks")
        }
        reals = {key: cls.on_checkpoint for key, cls in classes.items()}

        def restore() -> None:
            for key, cls in classes.items():
                cls.on_checkpoint = reals[key]

        def cancelling(real):
            def on_checkpoint(self, at_step, path):
                real(self, at_step, path)
                if at_step == step and path.parent.parent.name == run_name:
                    restore()
                    mm.interrupt_current_processing(True)

            return on_checkpoint

        for key, cls in classes.items():
            cls.on_checkpoint = cancelling(reals[key])
        return (model,)


NODE_CLASS_MAPPINGS = {
    "KleinLabTestConditioning": KleinLabTestConditioning,
    "KleinLabTestCLIPLoader": KleinLabTestCLIPLoader,
    "KleinLabTestInjectOOM": KleinLabTestInjectOOM,
    "KleinLabTestCancelAtCheckpoint": KleinLabTestCancelAtCheckpoint,
}
