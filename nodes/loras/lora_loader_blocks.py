"""Klein LoRA Loader (blocks): one LoRA at forward time, with block presets, group strengths or a block vector."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.model.variants import GROUPS
from ..comfy.forward_loras import StackItem, apply_items, loaded_summary
from ..comfy.paths import lora_list
from ..comfy.widgets import group_strength_inputs, preset_input, strength_input


class KleinLabLoraLoaderBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabLoraLoaderBlocks",
            display_name="Klein LoRA Loader (blocks)",
            category="Klein LoRA Lab/loaders",
            description=(
                "Applies a FLUX.2 [klein] LoRA at forward time (base weights never re-patched: a new strength or "
                "block setting is instant), only in the chosen blocks or with per-block strengths. Reads ours, "
                "kohya and diffusers key styles; refuses LoRAs made for another model."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.2 [klein] model (LoRAs already applied by our nodes stack)."),
                io.Combo.Input("lora_name", options=lora_list(), tooltip="A LoRA file from the loras folder."),
                strength_input("strength", "LoRA strength; negative values push away from the LoRA."),
                preset_input(),
                *group_strength_inputs(),
                strength_input(
                    "global_strength",
                    "Multiplier for modules outside the blocks (img_in, txt_in, time, modulation, final).",
                ),
                io.String.Input(
                    "block_vector",
                    default="",
                    tooltip="Preset 'custom' only: one strength per block, double blocks first then single "
                    "(4B: 25 values, 9B: 32), separated by commas or spaces. The block editor below writes it: a "
                    "slider per block, coloured by the course's four groups.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(
        cls, model, lora_name: str, strength: float, preset: str, global_strength: float, block_vector: str, **groups
    ) -> io.NodeOutput:
        item = StackItem(
            lora_name,
            strength,
            preset,
            tuple((g, groups[f"{g}_strength"]) for g in GROUPS),
            block_vector,
            global_strength,
        )
        patched, report = apply_items(model, [item])
        # The block editor (js/block_editor.js) shows what was loaded and learns the model's block count from it.
        return io.NodeOutput(patched, ui={"text": [report], "klein_blocks": [loaded_summary(model, patched)]})


NODES = [KleinLabLoraLoaderBlocks]
