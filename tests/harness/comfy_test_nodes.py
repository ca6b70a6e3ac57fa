"""Test-only ComfyUI node: copied into a test server's temp custom_nodes, never shipped with the pack.

There is no tiny text encoder (Qwen3's config is fixed), so tests feed CONDITIONING from a safetensors file
holding `cond` [batch, tokens, context_dim].
"""

from __future__ import annotations

from safetensors.torch import load_file


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


NODE_CLASS_MAPPINGS = {"KleinLabTestConditioning": KleinLabTestConditioning}
