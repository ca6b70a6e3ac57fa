"""Klein Scrub Checkpoints: one seed at every chosen checkpoint × scale × prompt of a run, on the loaded model.

Every frame uses the MODEL it receives with one LoRA applied at forward time (`apply_items` on that same input
model: a new checkpoint or scale is a new small wrapper on a clone, the base weights are never reloaded or
re-patched). Frames are sampled first and decoded afterwards in chunks, so the diffusion model and the VAE are
each loaded once. The frames, thumbnails and the labelled grid are written under
`output/klein_lora_lab/scrub/<run>/<8-hex of the inputs>/` and the node returns the scrubber's UI metadata
(nodes/comfy_render.py describes the contract).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import comfy.samplers
from comfy_api.latest import io

from ...trainer_core.album.latent_cache import fingerprint_tensors
from ...trainer_core.analysis.scrub import (
    SEP,
    Checkpoint,
    ScrubError,
    compose_grid,
    fmt_scale,
    frame_plan,
    inputs_key,
    lora_display,
    parse_prompts,
    parse_scales,
    scrub_axes,
    select_checkpoints,
)
from ...trainer_core.errors import shown
from ...trainer_core.files.safe_paths import resolve_inside
from ...trainer_core.runs.runfolder import checkpoint_step
from ..comfy.encoders import conditioning_tensor, vae_identity
from ..comfy.forward_loras import StackItem, apply_items, forward_loras_of, lora_list, lora_path, preset_input
from ..comfy.paths import folder_fingerprint, lora_list_name, register_runs_folder, runs_dir
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

LOG = logging.getLogger("klein_lora_lab")
FILES_OPTION = "(LoRA files below)"
POSITIVE_PROMPT = "(positive input)"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def checkpoint_files(folder: Path) -> dict[int, Path]:
    """step -> LoRA checkpoint file of a run folder (run.json is not needed to scrub)."""
    out = {}
    ckpt_dir = folder / "checkpoints"
    if ckpt_dir.is_dir():
        for path in ckpt_dir.glob("step_*.safetensors"):
            try:
                out[checkpoint_step(path)] = path
            except ValueError:
                continue  # not a checkpoint name (e.g. step_x.safetensors copied in by hand)
    return out


def runs_with_checkpoints() -> list[str]:
    """Run folders under <output>/klein_lora_lab/runs that hold at least one checkpoint, newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_files(p)]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)]


def run_checkpoints(run: str, selection: str) -> list[Checkpoint]:
    """The selected checkpoints of a run (ascending steps) as names of ComfyUI's loras list."""
    root = register_runs_folder()
    folder = resolve_inside(run, [root], "run", base=root)
    files = checkpoint_files(folder)
    try:
        steps = select_checkpoints(selection, sorted(files))
    except ScrubError as err:
        raise ScrubError(f"run '{run}': {err}") from err
    return [Checkpoint(lora_list_name(files[s]), s) for s in steps]


def file_checkpoints(text: str) -> list[Checkpoint]:
    """LoRA files of the loras list, one per line, in the order given (steps read from step_000600 names)."""
    register_runs_folder()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ScrubError(f"run is '{FILES_OPTION}' but lora_files is empty: list one LoRA of the loras list per line.")
    known = set(lora_list())
    out = []
    for name in dict.fromkeys(names):
        if name not in known:
            raise ScrubError(
                f"{shown(name)} is not in ComfyUI's loras list: copy the name from a LoRA loader's list "
                "(e.g. 'my_run/checkpoints/step_000600.safetensors') or put the file into models/loras."
            )
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        try:
            step = checkpoint_step(base)
        except ValueError:
            step = None
        out.append(Checkpoint(name, step))
    return out


def file_identity(names: list[str]) -> list[str]:
    """Name, size and mtime of each LoRA file: a re-trained checkpoint gives a new frames folder."""
    out = []
    for name in names:
        st = os.stat(lora_path(name))
        out.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return out


def model_identity(model, vae) -> str:
    """What the frames depend on besides the widgets: the base weights (sampled), weight patches and the pack's
    forward-time LoRAs already on the MODEL (a LoRA loader upstream), and the VAE."""
    upstream = forward_loras_of(model)
    loras = (
        [(s.label, s.strength, sorted((s.module_strength or {}).items())) for s in upstream.specs] if upstream else []
    )
    patches = model.patches_uuid if model.patches else ""
    weights = fingerprint_tensors(model.model.diffusion_model.state_dict().items(), extra=f"{loras}|{patches}")
    return f"{weights}|{vae_identity(vae)}"


def conditioning_identity(conditioning) -> str:
    return "none" if conditioning is None else fingerprint_tensors([("c", conditioning_tensor(conditioning))])


def resolve_negative(negative, clip, positive_like, cfg: float):
    """The negative: the connected one; else the empty prompt through CLIP; else (cfg 1 only) a zeroed copy of
    the positive, which ComfyUI never evaluates at cfg 1."""
    if negative is not None:
        return negative
    if clip is not None:
        return encode_prompts(clip, [""])[0]
    if cfg != 1.0:
        raise ScrubError(
            f"cfg={cfg:g} needs a negative: connect a negative conditioning or a CLIP (the empty prompt is used), "
            "or set cfg to 1."
        )
    return [[c.clone().zero_(), dict(extra)] for c, extra in positive_like]


def render_inputs() -> list:
    """The KSampler-like widgets shared by the scrub and mixer-grid nodes."""
    return [
        io.Int.Input("seed", default=0, min=0, max=MAX_SEED, tooltip="Seed of every frame (the same noise for all)."),
        io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per frame (Klein Base: ~50)."),
        io.Float.Input(
            "cfg", default=4.0, min=0.0, max=30.0, step=0.1, tooltip="CFG scale (Klein Base uses real CFG ~4)."
        ),
        io.Combo.Input(
            "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler, as KSampler."
        ),
        io.Combo.Input(
            "scheduler",
            options=comfy.samplers.KSampler.SCHEDULERS,
            default="simple",
            tooltip="Scheduler, as KSampler.",
        ),
        io.Int.Input("width", default=512, min=16, max=4096, step=16, tooltip="Frame width in pixels."),
        io.Int.Input("height", default=512, min=16, max=4096, step=16, tooltip="Frame height in pixels."),
    ]


def prompt_inputs() -> list:
    return [
        io.Clip.Input("clip", optional=True, tooltip="Text encoder for the prompts (and the empty negative)."),
        io.String.Input(
            "prompts",
            multiline=True,
            default="a photo of TOK",
            tooltip="One prompt per line (each line is one prompt of the grid); used with the clip input.",
        ),
        io.Conditioning.Input(
            "positive", optional=True, tooltip="A positive conditioning instead of clip + prompts (one prompt)."
        ),
        io.Conditioning.Input(
            "negative",
            optional=True,
            tooltip="Negative conditioning; without it the empty prompt through clip, or none when cfg is 1.",
        ),
    ]


def positives_of(clip, prompts: str, positive) -> tuple[list[str], list]:
    """(prompt texts, CONDITIONING per prompt): the positive input when connected, else clip + prompt lines."""
    if positive is not None:
        return [POSITIVE_PROMPT], [positive]
    if clip is None:
        raise ScrubError("connect a clip (with prompts) or a positive conditioning.")
    texts = parse_prompts(prompts)
    if not texts:
        raise ScrubError("prompts is empty: type one prompt per line.")
    return texts, encode_prompts(clip, texts)


class KleinLabScrubRun(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        runs = runs_with_checkpoints()
        return io.Schema(
            node_id="KleinLabScrubRun",
            display_name="Klein Scrub Checkpoints",
            category="Klein LoRA Lab/scrub",
            description=(
                "Renders one seed at the chosen checkpoints × scales × prompts of a training run (the learning "
                "arc), switching LoRAs at forward time on the loaded model. Frame order: checkpoint, then scale, "
                "then prompt."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.2 [klein] model the run was trained on."),
                io.Vae.Input("vae", tooltip="The Flux2 VAE to decode the frames."),
                io.Combo.Input(
                    "run",
                    options=[*runs, FILES_OPTION],
                    default=runs[0] if runs else FILES_OPTION,
                    tooltip="A run of output/klein_lora_lab/runs that has checkpoints, or "
                    f"'{FILES_OPTION}' to scrub the LoRA files listed in lora_files.",
                ),
                io.String.Input(
                    "lora_files",
                    multiline=True,
                    default="",
                    tooltip=f"With run = '{FILES_OPTION}': one LoRA of the loras list per line, in the order to show.",
                ),
                io.String.Input(
                    "checkpoints",
                    default="all",
                    tooltip="Which checkpoints of the run: 'all', 'last 5', 'first 2', 'every 2' (every 2nd), "
                    "'every 500 steps', a range '300-1200', or steps '300,600,1200' (terms can be combined "
                    "with commas). Ignored for LoRA files.",
                ),
                io.String.Input(
                    "scales",
                    default="0,0.5,1,1.5,2",
                    tooltip="LoRA scales, -4..4: a list '0,0.5,1,2,4' and/or ranges start:stop:step '0:4:0.5'.",
                ),
                *prompt_inputs(),
                *render_inputs(),
                preset_input("block_preset", custom=False),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Every frame, in the stable order."),
                io.Image.Output(display_name="grid", tooltip="Labelled grid: a row per checkpoint."),
                io.String.Output(
                    display_name="labels", tooltip="JSON list of {index, step, scale, prompt, label, lora}."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run: str, lora_files: str, **kwargs) -> str:
        # New or re-trained checkpoints re-render; an unchanged run reuses ComfyUI's cached frames.
        if run == FILES_OPTION:
            return "|".join(file_identity([n.strip() for n in lora_files.splitlines() if n.strip()]))
        root = runs_dir()
        return folder_fingerprint(resolve_inside(run, [root], "run", base=root) / "checkpoints")

    @classmethod
    def execute(
        cls,
        model,
        vae,
        run: str,
        lora_files: str,
        checkpoints: str,
        scales: str,
        prompts: str,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        width: int,
        height: int,
        block_preset: str,
        clip=None,
        positive=None,
        negative=None,
    ) -> io.NodeOutput:
        ckpts = file_checkpoints(lora_files) if run == FILES_OPTION else run_checkpoints(run, checkpoints)
        scale_values = parse_scales(scales)
        texts, positives = positives_of(clip, prompts, positive)
        frames = frame_plan(ckpts, scale_values, texts)  # validates the frame count before any rendering
        settings = RenderSettings(seed, steps, cfg, sampler_name, scheduler, width, height)
        neg = resolve_negative(negative, clip, positives[0], cfg)
        name = "lora_files" if run == FILES_OPTION else run
        key = inputs_key(
            {
                "model": model_identity(model, vae),
                "loras": file_identity([c.lora for c in ckpts]),
                "scales": scale_values,
                "prompts": texts,
                "positive": conditioning_identity(positive),
                "negative": conditioning_identity(negative),
                "settings": asdict(settings),
                "preset": block_preset,
            }
        )
        images, times = render_scrub(model, vae, ckpts, scale_values, positives, neg, settings, block_preset)
        LOG.info("Klein LoRA Lab: scrub %s: %s", name, times.line())
        pil = to_pil(images)
        title = f"{name}{SEP}seed {seed}{SEP}{steps} steps{SEP}cfg {cfg:g}"
        grid = scrub_grid(pil, frames, ckpts, scale_values, texts, title)
        meta = write_scrub_output(
            "KleinLabScrubRun",
            scrub_folder(name, key),
            scrub_axes(ckpts, scale_values, texts),
            [(f.coords, f.label) for f in frames],
            pil,
            grid,
        )
        labels = json.dumps([f.record() for f in frames], ensure_ascii=False)
        return io.NodeOutput(images, from_pil(grid), labels, ui={SCRUB_UI_KEY: [meta]})


def render_scrub(model, vae, ckpts, scales, positives, negative, settings: RenderSettings, preset: str):
    """All frames (checkpoint-major, then scale, then prompt) -> (IMAGE [n, H, W, 3], timings)."""

    def jobs():
        for ckpt in ckpts:
            for scale in scales:
                # A clone of the SAME input model with this one LoRA at forward time (scale 0: a plain clone).
                patched, _report = apply_items(model, [StackItem(ckpt.lora, scale, preset)])
                for positive in positives:
                    yield patched, positive

    total = len(ckpts) * len(scales) * len(positives)
    samples, times = render_frames(jobs(), negative, settings, total)
    return decode_frames(vae, samples, times), times


def scrub_grid(pil, frames, ckpts, scales, texts, title: str):
    """One row per checkpoint, one column per (scale, prompt): reading row by row follows the frame order."""
    if len(texts) > 1:
        col_headers = [f"scale {fmt_scale(s)}{SEP}prompt {p + 1}" for s in scales for p in range(len(texts))]
    else:
        col_headers = [f"scale {fmt_scale(s)}" for s in scales]
        title = f"{title}{SEP}{texts[0]}"
    labels = [f.label for f in frames]
    return compose_grid(pil, len(col_headers), labels, [lora_display(c) for c in ckpts], col_headers, title)


NODES = [KleinLabScrubRun]
