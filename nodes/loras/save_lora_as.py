"""Klein Save LoRA as…: a checkpoint, a stack or a mixed model's LoRAs baked into one file in the chosen style."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.lora.export import FORMAT_HELP, FORMATS
from ..comfy.export import ExportRequest, save_lora_as
from ..comfy.forward_loras import StackItem
from ..comfy.paths import lora_list
from ..comfy.sockets import LORA_STACK
from ..comfy.widgets import strength_input

NONE = "None"
MAX_RANK = 1024


class KleinLabSaveLoraAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabSaveLoraAs",
            display_name="Klein Save LoRA as…",
            category="Klein LoRA Lab/loras",
            description=(
                "Writes one LoRA file from a checkpoint, a LoRA stack, or the LoRAs a model carries from Klein "
                "LoRA loaders and the mixer, with their scales and block weights baked in; optionally resized to a "
                "target rank (the energy kept is shown). Styles: ComfyUI, diffusers, kohya/musubi. The file goes "
                "to the loras folder (klein_lora_lab/), so every LoRA loader lists it."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The FLUX.2 [klein] model the LoRA is for. LoRAs it carries from Klein LoRA loaders or "
                    "the mixer are baked in with their scales and block weights.",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=[NONE, *lora_list()],
                    default=NONE,
                    tooltip="A LoRA file (e.g. a run's checkpoint) to add at 'strength' ('None' = only the model's "
                    "LoRAs and the stack).",
                ),
                strength_input("strength", "Scale baked into the file for 'lora_name'."),
                io.Combo.Input(
                    "format",
                    options=list(FORMATS),
                    default="ComfyUI",
                    tooltip="Key style of the file: " + "; ".join(f"{k} = {v}" for k, v in FORMAT_HELP.items()),
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=MAX_RANK,
                    tooltip="0 = keep every module exact; a number = resize each module to that rank by SVD "
                    "(smaller file; the energy kept is reported).",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="klein_lora",
                    tooltip="File name (may hold subfolders) inside loras/klein_lora_lab/; a counter is added.",
                ),
                io.String.Input(
                    "trigger",
                    default="",
                    tooltip="Trigger word written into the file's metadata (empty = the checkpoint's own trigger).",
                ),
                LORA_STACK.Input("lora_stack", optional=True, tooltip="More LoRAs from Klein LoRA Stack nodes."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        model,
        lora_name: str,
        strength: float,
        format: str,
        rank: int,
        filename_prefix: str,
        trigger: str,
        lora_stack=None,
    ) -> io.NodeOutput:
        items = (*(lora_stack or ()), *((StackItem(lora_name, strength),) if lora_name != NONE else ()))
        request = ExportRequest(tuple(items), format, rank, filename_prefix, trigger.strip())
        name, report = save_lora_as(model, request)
        return io.NodeOutput(name, ui={"text": [report]})


NODES = [KleinLabSaveLoraAs]
