"""Klein LoRA Stack: append one LoRA (on/off, strength, block preset) to a stack that a Klein LoRA Mixer applies;
chain as many as you like."""

from __future__ import annotations

from comfy_api.latest import io

from ..comfy.forward_loras import StackItem
from ..comfy.paths import lora_list
from ..comfy.sockets import LORA_STACK
from ..comfy.widgets import preset_input, strength_input


class KleinLabLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabLoraStack",
            display_name="Klein LoRA Stack",
            category="Klein LoRA Lab/loaders",
            description="Adds a LoRA to a LoRA stack (chain several of these); a Klein LoRA Mixer applies the stack.",
            inputs=[
                io.Boolean.Input(
                    "enabled",
                    default=True,
                    label_on="on",
                    label_off="off",
                    tooltip="On/off: off passes the incoming stack on unchanged (the LoRA keeps its settings).",
                ),
                io.Combo.Input("lora_name", options=lora_list(), tooltip="A LoRA file from the loras folder."),
                strength_input("strength", "LoRA strength; negative values push away from the LoRA."),
                preset_input(custom=False),
                LORA_STACK.Input("lora_stack", optional=True, tooltip="A stack to append to (left unchanged)."),
            ],
            outputs=[LORA_STACK.Output(display_name="lora_stack")],
        )

    @classmethod
    def execute(cls, enabled: bool, lora_name: str, strength: float, preset: str, lora_stack=None) -> io.NodeOutput:
        added = (StackItem(lora_name, strength, preset),) if enabled else ()
        return io.NodeOutput((*(lora_stack or ()), *added))


NODES = [KleinLabLoraStack]
