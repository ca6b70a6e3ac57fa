"""Klein LoRA Mixer: several LoRAs at forward time on one model, each with an on/off toggle, its own scale and block
preset: four slots, any number of rows added in the node ('+ Add LoRA', the `more_loras` text), and more through the
`lora_stack` input (a chain of Klein LoRA Stack nodes)."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.lora.mix_rows import parse_mix_rows
from ..comfy.forward_loras import StackItem, apply_items, loaded_summary
from ..comfy.sockets import LORA_STACK
from ..comfy.widgets import lora_combo, preset_input, strength_input

SLOTS = 4
NONE = "None"


def _slot_inputs(i: int) -> list:
    return [
        io.Boolean.Input(
            f"on_{i}",
            default=True,
            label_on="on",
            label_off="off",
            tooltip=f"Slot {i} on/off: off leaves the LoRA out without losing its file, scale and preset.",
        ),
        lora_combo(f"lora_{i}", f"LoRA of slot {i} ('None' = empty slot).", none_option=NONE),
        strength_input(f"scale_{i}", f"Scale of slot {i}; negative values push away from the LoRA."),
        preset_input(f"preset_{i}", custom=False),
    ]


class KleinLabLoraMixer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabLoraMixer",
            display_name="Klein LoRA Mixer",
            category="Klein LoRA Lab/loaders",
            description=(
                "Mixes several FLUX.2 [klein] LoRAs at forward time (e.g. a subject and a style LoRA), each with "
                "an on/off toggle, its own scale and block preset; '+ Add LoRA' adds rows in the node, and Klein LoRA "
                "Stack nodes chained into lora_stack add as many more as you like. Changing a scale or a toggle "
                "never re-patches the model weights."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.2 [klein] model."),
                *[inp for i in range(1, SLOTS + 1) for inp in _slot_inputs(i)],
                LORA_STACK.Input("lora_stack", optional=True, tooltip="More LoRAs from Klein LoRA Stack nodes."),
                io.String.Input(
                    "more_loras",
                    default="",
                    optional=True,
                    advanced=True,
                    tooltip="The LoRAs added with '+ Add LoRA' in the node (each with on/off, scale, preset and, for "
                    'preset custom, its per-block vector), as the row editor writes them: [{"on": true, "lora": '
                    '"a.safetensors", "scale": 1, "preset": "all", "blocks": ""}].',
                ),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_stack=None, more_loras: str = "", **slots) -> io.NodeOutput:
        items = [
            StackItem(slots[f"lora_{i}"], slots[f"scale_{i}"], slots[f"preset_{i}"])
            for i in range(1, SLOTS + 1)
            if slots[f"lora_{i}"] != NONE and slots[f"on_{i}"]
        ]
        rows = parse_mix_rows(more_loras)
        added = [StackItem(r.lora, r.scale, r.preset, block_vector=r.block_vector) for r in rows if r.on]
        patched, report = apply_items(model, [*items, *added, *(lora_stack or ())])
        # The rows' block editors (js/mixer_rows.js) learn the model's block count from klein_blocks.
        return io.NodeOutput(patched, ui={"text": [report], "klein_blocks": [loaded_summary(model, patched)]})


NODES = [KleinLabLoraMixer]
