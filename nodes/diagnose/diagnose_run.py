"""Klein Diagnose Run: the lab's clinic as numbers, per checkpoint × scale of a training run.

For each chosen checkpoint and scale the node renders three prompt groups at one seed (album-like trigger
prompts, novel prompts the album never showed — the bicycle test — and prompts without the trigger), plus the
base model (scale 0) once as the reference. trainer_core/analysis/diagnose.py runs the pass: it measures each
(checkpoint, scale) against the base and the album's latents (the encoded dataset the run trained on), writes
one record per checkpoint × scale into `<run>/diagnostics.json` (atomically) and suggests the sweet spot; this
node supplies the rendering (ComfyUI's sampler with a forward-time LoRA on a clone of the same input MODEL, and
the VAE) and returns the report and the sweet-spot chart. With a sweep connected it diagnoses every run of the
sweep the same way and ends the report with the sweep read in words (nodes/comfy/diagnosis.py).
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.analysis.diagnostics import GROUPS
from ...trainer_core.runs.sweep import Sweep
from ..comfy.diagnosis import DiagnoseRequest, diagnose_folder, diagnose_sweep
from ..comfy.paths import folder_fingerprint
from ..comfy.render import RenderSettings
from ..comfy.runs import open_existing_run, run_folder, runs_with_settings
from ..comfy.sockets import ENCODED_DATASET
from ..comfy.sweeps import SWEEP, sweep_runs
from ..comfy.widgets import MAX_SEED, run_combo

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


class KleinLabDiagnoseRun(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        runs = runs_with_settings()
        return io.Schema(
            node_id="KleinLabDiagnoseRun",
            display_name="Klein Diagnose Run",
            category="Klein LoRA Lab/diagnostics",
            description=(
                "The bicycle test and the diagnosis clinic as numbers: renders trigger, novel and trigger-free "
                "prompts at each checkpoint × scale, measures memorisation, prompt flexibility, concept strength "
                "and trigger-free drift against the base model and the album, and writes <run>/diagnostics.json. "
                "Connect a sweep to diagnose every run of it and read the sweep in words."
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
                SWEEP.Input(
                    "sweep",
                    optional=True,
                    tooltip="Optional, from 'Klein Sweep' or 'Klein Load Sweep': diagnose every run of the sweep "
                    "(the run above is then ignored) and end the report with the sweep read in words.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="report",
                    tooltip="Measures and findings per checkpoint × scale (per run of a sweep, then its reading).",
                ),
                io.Image.Output(display_name="chart", tooltip="The curves and the suggested sweet spot (one per run)."),
                io.Image.Output(
                    display_name="frames", tooltip="Base frames, then checkpoint × scale × prompt (run after run)."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run: str, sweep: Sweep | None = None, **kwargs) -> str:
        # New checkpoints (with 'all' or 'last N') measure again; an unchanged run reuses ComfyUI's cached result.
        if sweep is not None:
            return folder_fingerprint(*(f / "checkpoints" for f in sweep_runs(sweep)))
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
        sweep: Sweep | None = None,
        **widgets,
    ) -> io.NodeOutput:
        """widgets: the three prompt groups' lines (`<group>_prompts`) and the KSampler-like render widgets."""
        texts = {g: widgets[f"{g}_prompts"] for g in GROUPS}
        settings = RenderSettings.from_widgets(widgets)
        request = DiagnoseRequest(model, clip, vae, encoded_dataset, checkpoints, scales, texts, settings)
        if sweep is not None:
            out = diagnose_sweep(request, sweep)
        else:
            folder = open_existing_run(run)
            out = diagnose_folder(request, folder, folder.path.name)
        return io.NodeOutput(
            out.text, out.chart, out.frames, ui={"text": [out.text], **ui.PreviewImage(out.chart, cls=cls).as_dict()}
        )


NODES = [KleinLabDiagnoseRun]
