"""Klein model info: which Klein this is, its block counts and the course's block groups."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.model.klein import read_shape
from ...trainer_core.model.variants import GROUP_HELP, block_groups, detect_variant


def describe_model(diffusion_model) -> str:
    shape = read_shape(diffusion_model)
    variant = detect_variant(shape)
    lines = [
        f"{variant.name}: {shape.double_blocks} double + {shape.single_blocks} single blocks, "
        f"hidden {shape.hidden} ({shape.heads} heads), text context {shape.context_dim}",
    ]
    for group, blocks in block_groups(shape).items():
        span = f"{blocks[0]} … {blocks[-1]}" if blocks else "(none)"
        lines.append(f"  {group:<12} {len(blocks):>2} blocks  {span}  — {GROUP_HELP[group]}")
    return "\n".join(lines)


class KleinLabModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabModelInfo",
            display_name="Klein Model Info",
            category="Klein LoRA Lab/utils",
            description="Shows which FLUX.2 [klein] model is loaded and the course's block groups for it.",
            inputs=[io.Model.Input("model", tooltip="A FLUX.2 [klein] Base model from 'Load Diffusion Model'.")],
            outputs=[io.String.Output(display_name="info")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        text = describe_model(model.model.diffusion_model)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [KleinLabModelInfo]
