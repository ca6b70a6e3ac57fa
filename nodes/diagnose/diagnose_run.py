"""Klein Diagnose Run: the lab's clinic as numbers, per checkpoint × scale of a training run.

For each chosen checkpoint and scale the node renders three prompt groups at one seed (album-like trigger
prompts, novel prompts the album never showed — the bicycle test — and prompts without the trigger), plus the
base model (scale 0) once as the reference. trainer_core.diagnostics measures each (checkpoint, scale) against
the base and the album's latents (the encoded dataset the run trained on), `<run>/diagnostics.json` gets one
record per checkpoint × scale (written atomically), and the node returns a report and the sweet-spot chart.
Rendering reuses the loaded model: every frame is a forward-time LoRA on a clone of the same input MODEL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ...trainer_core.album.dataset import insert_trigger
from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.analysis.diagnostics import GROUPS, Renders, clinic, latent_features, measure, pixel_features
from ...trainer_core.analysis.loss_curve import to_image_tensor
from ...trainer_core.analysis.scrub import parse_prompts, parse_scales, select_checkpoints
from ...trainer_core.analysis.sweet_spot import read_diagnostics, render_sweet_spot, suggest, write_diagnostics
from ...trainer_core.files.safe_paths import resolve_inside
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ..comfy.forward_loras import StackItem, apply_items
from ..comfy.paths import folder_fingerprint, lora_list_name, register_runs_folder, runs_dir
from ..comfy.render import RenderSettings, decode_frames, encode_prompts, render_frames
from ..scrub.scrub_run import MAX_SEED, runs_with_checkpoints
from ..train.encode_dataset import ENCODED_DATASET

LOG = logging.getLogger("klein_lora_lab")
DEFAULT_PROMPTS = {
    "trigger": "a photo of [trigger]",
    "novel": "a photo of [trigger] riding a bicycle\na photo of [trigger] on a striped beach towel by the sea",
    "trigger_free": "a photo of a bicycle leaning against a brick wall\na bowl of fruit on a wooden table",
}
PROMPT_TIPS = {
    "trigger": "Album-like prompts with the trigger, one per line ([trigger] = the run's trigger word): how "
    "strongly the concept arrives.",
    "novel": "Prompts the album never showed (the bicycle test), one per line: a LoRA that hands the album back "
    "here has memorised it.",
    "trigger_free": "Prompts without the trigger, one per line: they should stay what the base model draws.",
}


def run_names() -> list[str]:
    """The scrub node's runs (with checkpoints, newest first) that also have a run.json (settings and trigger are
    read from it); the file is only checked for existence: a damaged run.json must not keep the node from
    registering."""
    return [name for name in runs_with_checkpoints() if (runs_dir() / name / "run.json").is_file()]


def run_folder(run: str) -> Path:
    """The folder of a run name, resolved inside the runs folder (no '..', absolute path or symlink out)."""
    root = register_runs_folder()
    return resolve_inside(run, [root], "run", base=root)


def open_run(run: str) -> RunFolder:
    return RunFolder.open(run_folder(run))


def run_combo(runs: list[str], tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("run", options=runs or [""], default=runs[0] if runs else "", tooltip=tooltip)


def prompt_groups(texts: dict[str, str], trigger: str) -> tuple[list[str], dict[str, list[int]]]:
    """(every prompt in group order, group -> row indices); '[trigger]' becomes the run's trigger word."""
    prompts: list[str] = []
    groups: dict[str, list[int]] = {}
    for group in GROUPS:
        lines = [insert_trigger(p, trigger, "none") for p in parse_prompts(texts[group])]
        groups[group] = list(range(len(prompts), len(prompts) + len(lines)))
        prompts.extend(lines)
    if len(prompts) < 2:
        raise ValueError("give at least two prompts in all (flexibility compares generations of different prompts).")
    return prompts, groups


def album_renders(encoded: EncodedDataset, vae) -> Renders:
    """Features of the album: its latents as encoded for training, and their VAE decodes (the same decoder as the
    generations, so pixel distances compare like with like), decoded one latent size at a time."""
    latents = [item.latent for item in encoded.items]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, latent in enumerate(latents):
        by_size.setdefault(tuple(latent.shape), []).append(i)
    images: list[torch.Tensor | None] = [None] * len(latents)
    for rows in by_size.values():
        decoded = decode_frames(vae, torch.stack([latents[i] for i in rows]))
        for i, image in zip(rows, decoded, strict=True):
            images[i] = image
    return Renders(latent_features(latents), pixel_features(images))


def report_lines(records: list[dict], album_note: str, timing: str) -> list[str]:
    lines = [album_note, timing] if album_note else [timing]
    for r in records:
        found = ", ".join(r["findings"]) or "healthy"
        lines.append(
            f"step {r['step']} · scale {r['scale']:g}: concept {_n(r['concept'])}, flexibility "
            f"{_n(r['flexibility'])}, bicycle {_n(r['memorisation'])}, trigger-free drift "
            f"{_n(r['trigger_free_drift'])} -> {found}"
        )
    return lines


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


class KleinLabDiagnoseRun(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        runs = run_names()
        return io.Schema(
            node_id="KleinLabDiagnoseRun",
            display_name="Klein Diagnose Run",
            category="Klein LoRA Lab/diagnostics",
            description=(
                "The bicycle test and the diagnosis clinic as numbers: renders trigger, novel and trigger-free "
                "prompts at each checkpoint × scale, measures memorisation, prompt flexibility, concept strength "
                "and trigger-free drift against the base model and the album, and writes <run>/diagnostics.json."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.2 [klein] Base model the run was trained on."),
                io.Clip.Input("clip", tooltip="Klein's text encoder (Load CLIP, type flux2) for the prompts."),
                io.Vae.Input("vae", tooltip="The Flux2 VAE: decodes generations and album for pixel distances."),
                ENCODED_DATASET.Input(
                    "encoded_dataset",
                    tooltip="The album the run trained on, from 'Klein Encode Dataset (cached)' (read from its cache).",
                ),
                run_combo(runs, "A run of output/klein_lora_lab/runs with checkpoints."),
                io.String.Input(
                    "checkpoints",
                    default="all",
                    tooltip="Which checkpoints: 'all', 'last 5', 'every 2', a range '300-1200' or steps '300,600'.",
                ),
                io.String.Input(
                    "scales",
                    default="0.5,1,2,4",
                    tooltip="LoRA scales to measure, e.g. '0.5,1,2,4' or '0.5:4:0.5' (the base, scale 0, is always "
                    "rendered as the reference).",
                ),
                *[
                    io.String.Input(f"{g}_prompts", default=DEFAULT_PROMPTS[g], multiline=True, tooltip=PROMPT_TIPS[g])
                    for g in GROUPS
                ],
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    control_after_generate=False,  # a diagnosis compares passes: the seed must stay put
                    tooltip="One seed for every generation (keep it fixed to compare passes).",
                ),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps (Klein Base: ~50)."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=30.0, step=0.1, tooltip="CFG (Klein Base ~4)."),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="As KSampler."
                ),
                io.Combo.Input(
                    "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple", tooltip="As KSampler."
                ),
                io.Int.Input("width", default=512, min=16, max=4096, step=16, tooltip="Generation width, pixels."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16, tooltip="Generation height, pixels."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Measures and findings per checkpoint × scale."),
                io.Image.Output(display_name="chart", tooltip="The curves and the suggested sweet spot."),
                io.Image.Output(display_name="frames", tooltip="Base frames, then checkpoint × scale × prompt."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run: str, **kwargs) -> str:
        # New checkpoints (with 'all' or 'last N') measure again; an unchanged run reuses ComfyUI's cached result.
        return folder_fingerprint(run_folder(run) / "checkpoints")

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        encoded_dataset: EncodedDataset,
        run: str,
        checkpoints: str,
        scales: str,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        width: int,
        height: int,
        **prompt_texts: str,
    ) -> io.NodeOutput:
        folder = open_run(run)
        trigger = str(folder.meta.get("trigger", "")) or encoded_dataset.trigger
        prompts, groups = prompt_groups({g: prompt_texts[f"{g}_prompts"] for g in GROUPS}, trigger)
        files = {checkpoint_step(p): p for p in folder.checkpoints()}
        chosen = select_checkpoints(checkpoints, sorted(files))
        scale_values = [s for s in parse_scales(scales, 0.0, 4.0) if s > 0]
        if not scale_values:
            raise ValueError(f"scales '{scales}' has no scale above 0: give e.g. '0.5,1,2,4'.")
        settings = RenderSettings(seed, steps, cfg, sampler_name, scheduler, width, height)
        records, frames, timing = diagnose(
            model, clip, vae, encoded_dataset, files, chosen, scale_values, prompts, groups, settings
        )
        config = {
            "prompts": {g: [prompts[i] for i in groups[g]] for g in GROUPS},
            "render": dict(settings.__dict__),
            "album_hash": encoded_dataset.dataset_hash,
        }
        write_diagnostics(folder.path, config, records)
        spot = suggest(read_diagnostics(folder.path)["records"], folder.read_metrics(), sorted(files))
        note = ""
        if folder.meta.get("album_hash") not in (None, encoded_dataset.dataset_hash):
            note = (
                f"note: the encoded dataset (album {encoded_dataset.dataset_hash}) is not the album this run "
                f"trained on ({folder.meta['album_hash']}): connect the same dataset for meaningful distances."
            )
        text = "\n".join([*report_lines(records, note, timing), "", spot.text()])
        chart = to_image_tensor(render_sweet_spot(spot, title=folder.path.name))
        return io.NodeOutput(text, chart, frames, ui={"text": [text], **ui.PreviewImage(chart, cls=cls).as_dict()})


def diagnose(model, clip, vae, encoded, files, chosen, scales, prompts, groups, settings: RenderSettings):
    """Render base + every checkpoint × scale × prompt and measure them -> (records, frames IMAGE, timing line)."""
    positives = encode_prompts(clip, prompts)
    negative = encode_prompts(clip, [""])[0]
    names = {step: lora_list_name(files[step]) for step in chosen}

    def jobs():
        for positive in positives:
            yield model, positive  # the base model (scale 0): the reference of every measure
        for step in chosen:
            for scale in scales:
                patched, _report = apply_items(model, [StackItem(names[step], scale)])
                for positive in positives:
                    yield patched, positive

    n = len(prompts)
    total = n * (1 + len(chosen) * len(scales))
    start = time.perf_counter()
    samples, _times = render_frames(jobs(), negative, settings, total)  # jobs run lazily: one clone at a time
    sampled = time.perf_counter()
    images = decode_frames(vae, samples)
    album = album_renders(encoded, vae)
    decoded = time.perf_counter()
    feats = Renders(latent_features(samples), pixel_features(images))
    base = feats.rows(range(n))
    records = []
    for k, (step, scale) in enumerate((s, c) for s in chosen for c in scales):
        rows = range(n * (k + 1), n * (k + 2))
        measures = measure(feats.rows(rows), base, album, groups)
        records.append({"step": step, "scale": scale, "lora": names[step], **measures, "findings": clinic(measures)})
    seconds = time.perf_counter() - start
    timing = (
        f"{total} frames ({len(chosen)} checkpoints × {len(scales)} scales × {n} prompts + {n} base) in "
        f"{seconds:.1f} s ({sampled - start:.1f} s sampling, {decoded - sampled:.1f} s decoding generations and "
        f"album), {seconds / max(1, len(chosen)):.2f} s per checkpoint"
    )
    LOG.info("Klein LoRA Lab: diagnose: %s", timing)
    return records, images, timing


NODES = [KleinLabDiagnoseRun]
