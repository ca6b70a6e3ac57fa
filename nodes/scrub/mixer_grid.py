"""Klein LoRA Mixer Grid: LoRA A's scale × LoRA B's scale (the lab's TOK × TOKSTYLE grid) on the loaded model.

Each cell is the input MODEL with both LoRAs applied at forward time at that cell's scales (`apply_items` on the
same input model, no reload, no re-patching), the same seed and prompt everywhere. Outputs and UI metadata follow
the scrub contract (nodes/comfy_render.py) with the axes `scale_a` and `scale_b`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict

from comfy_api.latest import io

from ...trainer_core.analysis.scrub import (
    SEP,
    ScrubError,
    compose_grid,
    fmt_scale,
    inputs_key,
    mixer_plan,
    parse_scales,
)
from ..comfy.forward_loras import StackItem, apply_items, lora_list, preset_input
from ..comfy.render import (
    SCRUB_UI_KEY,
    RenderSettings,
    decode_frames,
    encode_prompts,
    from_pil,
    render_frames,
    scrub_folder,
    to_pil,
    write_scrub_output,
)
from .scrub_run import (
    POSITIVE_PROMPT,
    conditioning_identity,
    file_identity,
    model_identity,
    render_inputs,
    resolve_negative,
)

LOG = logging.getLogger("klein_lora_lab")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def short_name(lora: str) -> str:
    """A LoRA's file name without folders and extension (what the grid's labels call it)."""
    base = lora.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def grid_names(lora_a: str, lora_b: str) -> tuple[str, str]:
    """Label names of A and B; two checkpoints with the same file name (step_000600 of two runs) get A/B marks."""
    a, b = short_name(lora_a), short_name(lora_b)
    return (a, b) if a != b else (f"A {a}", f"B {b}")


def folder_name(name_a: str, name_b: str) -> str:
    """`mixer_<A>_x_<B>` with only filename-safe characters (the grid's folder under output/.../scrub)."""
    return "mixer_" + _UNSAFE.sub("_", f"{name_a}_x_{name_b}")[:96].strip("._")


def lora_combo(name: str, tooltip: str) -> io.Combo.Input:
    options = lora_list()
    return io.Combo.Input(name, options=options, default=options[0] if options else None, tooltip=tooltip)


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
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Negative conditioning; without it the empty prompt through clip, or none when cfg is 1.",
                ),
                *render_inputs(),
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
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        width: int,
        height: int,
        clip=None,
        positive=None,
        negative=None,
    ) -> io.NodeOutput:
        values_a = parse_scales(scales_a, what="scales of A")
        values_b = parse_scales(scales_b, what="scales of B")
        name_a, name_b = grid_names(lora_a, lora_b)
        frames = mixer_plan(name_a, name_b, values_a, values_b)
        given_positive = positive
        if positive is None:
            if clip is None:
                raise ScrubError("connect a clip (with the prompt) or a positive conditioning.")
            positive = encode_prompts(clip, [prompt])[0]
            shown_prompt = prompt
        else:
            shown_prompt = POSITIVE_PROMPT
        settings = RenderSettings(seed, steps, cfg, sampler_name, scheduler, width, height)
        neg = resolve_negative(negative, clip, positive, cfg)

        def jobs():
            for f in frames:
                items = [StackItem(lora_a, f.scale_a, preset_a), StackItem(lora_b, f.scale_b, preset_b)]
                yield apply_items(model, items)[0], positive  # a clone of the SAME input model per cell

        samples, times = render_frames(jobs(), neg, settings, len(frames))
        images = decode_frames(vae, samples, times)
        LOG.info("Klein LoRA Lab: mixer grid %s × %s: %s", name_a, name_b, times.line())
        pil = to_pil(images)
        title = f"{name_a} × {name_b}{SEP}seed {seed}{SEP}{steps} steps{SEP}cfg {cfg:g}{SEP}{shown_prompt}"
        grid = compose_grid(
            pil,
            len(values_b),
            [f.label for f in frames],
            [f"{name_a} {fmt_scale(s)}" for s in values_a],
            [f"{name_b} {fmt_scale(s)}" for s in values_b],
            title,
        )
        key = inputs_key(
            {
                "model": model_identity(model, vae),
                "loras": file_identity([lora_a, lora_b]),
                "scales": [values_a, values_b],
                "presets": [preset_a, preset_b],
                "prompt": prompt if given_positive is None else "",
                "positive": conditioning_identity(given_positive),
                "negative": conditioning_identity(negative),
                "settings": asdict(settings),
            }
        )
        meta = write_scrub_output(
            "KleinLabMixerGrid",
            scrub_folder(folder_name(name_a, name_b), key),
            [{"name": "scale_a", "values": values_a}, {"name": "scale_b", "values": values_b}],
            [(f.coords, f.label) for f in frames],
            pil,
            grid,
        )
        labels = json.dumps([f.record(lora_a, lora_b, shown_prompt) for f in frames], ensure_ascii=False)
        return io.NodeOutput(images, from_pil(grid), labels, ui={SCRUB_UI_KEY: [meta]})


NODES = [KleinLabMixerGrid]
