"""Klein LoRA Mixer Grid: LoRA A's scale × LoRA B's scale (the lab's TOK × TOKSTYLE grid) on the loaded model.

Each cell is the input MODEL with both LoRAs applied at forward time at that cell's scales (`apply_items` on the
same input model, no reload, no re-patching), the same seed and prompt everywhere. Outputs and UI metadata follow
the scrub contract (nodes/comfy/render.py; the pipeline is nodes/comfy/scrub.py) with the axes `scale_a` and `scale_b`.
"""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.analysis.scrub import SEP, fmt_scale, grid_names, mixer_folder_name, mixer_plan, parse_scales
from ..comfy.forward_loras import StackItem
from ..comfy.identities import conditioning_identity, file_identity
from ..comfy.render import RenderSettings
from ..comfy.scrub import GridRender, grid_prompts, render_grid
from ..comfy.widgets import lora_combo, negative_input, preset_input, render_inputs, sampling_input


class KleinLabMixerGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabMixerGrid",
            display_name="Klein LoRA Mixer Grid",
            category="Klein LoRA Lab/scrub",
            description=(
                "Renders LoRA A's scales × LoRA B's scales (e.g. a TOK subject × a TOKSTYLE style) with one seed and "
                "prompt, mixing both LoRAs at forward time on the loaded model. Rows: scale of A; columns: scale of B."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.2 [klein] model."),
                io.Vae.Input("vae", tooltip="The Flux2 VAE to decode the frames."),
                lora_combo("lora_a", "LoRA A (rows), e.g. the subject (TOK) LoRA."),
                io.String.Input("scales_a", default="0,0.5,1", tooltip="Scales of A, -4..4: '0,0.5,1' or '0:1:0.25'."),
                preset_input("preset_a", custom=False),
                lora_combo("lora_b", "LoRA B (columns), e.g. the style (TOKSTYLE) LoRA."),
                io.String.Input("scales_b", default="0,0.5,1", tooltip="Scales of B, -4..4: '0,0.5,1' or '0:1:0.25'."),
                preset_input("preset_b", custom=False),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder for the prompt (and the empty negative)."),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="a photo of TOK in TOKSTYLE style",
                    tooltip="The prompt of every cell (encoded as CLIP Text Encode does); used with the clip input.",
                ),
                io.Conditioning.Input("positive", optional=True, tooltip="A positive conditioning instead of clip."),
                negative_input(),
                *render_inputs(),
                sampling_input(),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Every cell, row by row (scale of A, then of B)."),
                io.Image.Output(display_name="grid", tooltip="Labelled grid: rows = scale of A, columns = scale of B."),
                io.String.Output(display_name="labels", tooltip="JSON list of {index, scale_a, scale_b, label, ...}."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, lora_a: str, lora_b: str, **kwargs) -> str:
        return "|".join(file_identity([lora_a, lora_b]))  # a re-trained file re-renders

    @classmethod
    def execute(
        cls,
        model,
        vae,
        lora_a: str,
        scales_a: str,
        preset_a: str,
        lora_b: str,
        scales_b: str,
        preset_b: str,
        prompt: str,
        clip=None,
        positive=None,
        negative=None,
        **render,
    ) -> io.NodeOutput:
        values_a = parse_scales(scales_a, what="scales of A")
        values_b = parse_scales(scales_b, what="scales of B")
        name_a, name_b = grid_names(lora_a, lora_b)
        frames = mixer_plan(name_a, name_b, values_a, values_b)
        settings = RenderSettings.from_widgets(render)
        asked = grid_prompts(clip, prompt, positive, negative, settings.cfg, one_prompt=True)
        shown_prompt = asked.texts[0]
        grid = GridRender(
            node="KleinLabMixerGrid",
            name=mixer_folder_name(name_a, name_b),
            log_name=f"mixer grid {name_a} × {name_b}",
            stacks=[[StackItem(lora_a, f.scale_a, preset_a), StackItem(lora_b, f.scale_b, preset_b)] for f in frames],
            prompts=asked,
            settings=settings,
            axes=[{"name": "scale_a", "values": values_a}, {"name": "scale_b", "values": values_b}],
            frames=frames,
            records=[f.record(lora_a, lora_b, shown_prompt) for f in frames],
            title=f"{name_a} × {name_b}{SEP}{settings.caption()}{SEP}{shown_prompt}",
            row_headers=[f"{name_a} {fmt_scale(s)}" for s in values_a],
            col_headers=[f"{name_b} {fmt_scale(s)}" for s in values_b],
            key={
                "loras": file_identity([lora_a, lora_b]),
                "scales": [values_a, values_b],
                "presets": [preset_a, preset_b],
                "prompt": prompt if positive is None else "",
                "positive": conditioning_identity(positive),
                "negative": conditioning_identity(negative),
            },
        )
        return render_grid(model, vae, grid)


NODES = [KleinLabMixerGrid]
