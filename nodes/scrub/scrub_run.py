"""Klein Scrub Checkpoints: one seed at every chosen checkpoint × scale × prompt of a run, on the loaded model.

Every frame uses the MODEL it receives with one LoRA applied at forward time (`apply_items` on that same input
model: a new checkpoint or scale is a new small wrapper on a clone, the base weights are never reloaded or
re-patched). Frames are sampled first and decoded afterwards in chunks, so the diffusion model and the VAE are
each loaded once. The frames, thumbnails and the labelled grid are written under
`output/klein_lora_lab/scrub/<run>/<8-hex of the inputs>/` and the node returns the scrubber's UI metadata
(nodes/comfy/render.py describes the contract; nodes/comfy/scrub.py is the pipeline).
"""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.analysis.scrub import SEP, frame_plan, parse_scales, scrub_axes, scrub_headers
from ...trainer_core.files.safe_paths import resolve_inside
from ..comfy.forward_loras import StackItem
from ..comfy.identities import conditioning_identity, file_identity
from ..comfy.paths import folder_fingerprint, runs_dir
from ..comfy.render import RenderSettings
from ..comfy.runs import FILES_OPTION, file_checkpoints, run_checkpoints, runs_with_checkpoints
from ..comfy.scrub import GridRender, grid_prompts, render_grid
from ..comfy.sweep_scrub import scrub_sweep, sweep_fingerprint
from ..comfy.sweeps import SWEEP
from ..comfy.widgets import preset_input, prompt_inputs, render_inputs, sampling_input


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
                SWEEP.Input(
                    "sweep",
                    optional=True,
                    tooltip="From 'Klein Sweep': scrub every run of the sweep (a run axis before the checkpoints); "
                    "run and lora_files are then ignored, the checkpoint selection applies to each run.",
                ),
                sampling_input(),
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
        if kwargs.get("sweep") is not None:
            return sweep_fingerprint(kwargs["sweep"])
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
        block_preset: str,
        clip=None,
        positive=None,
        negative=None,
        sweep=None,
        **render,
    ) -> io.NodeOutput:
        if sweep is not None:
            settings = RenderSettings.from_widgets(render)
            return scrub_sweep(
                model, vae, sweep, checkpoints, scales, prompts, settings, block_preset, clip, positive, negative
            )
        ckpts = file_checkpoints(lora_files) if run == FILES_OPTION else run_checkpoints(run, checkpoints)
        scale_values = parse_scales(scales)
        settings = RenderSettings.from_widgets(render)
        asked = grid_prompts(clip, prompts, positive, negative, settings.cfg)
        texts = asked.texts
        frames = frame_plan(ckpts, scale_values, texts)  # validates the frame count before any rendering
        name = "lora_files" if run == FILES_OPTION else run
        rows, cols, title = scrub_headers(ckpts, scale_values, texts, f"{name}{SEP}{settings.caption()}")
        grid = GridRender(
            node="KleinLabScrubRun",
            name=name,
            log_name=f"scrub {name}",
            stacks=[[StackItem(c.lora, scale, block_preset)] for c in ckpts for scale in scale_values],
            prompts=asked,
            settings=settings,
            axes=scrub_axes(ckpts, scale_values, texts),
            frames=frames,
            records=[f.record() for f in frames],
            title=title,
            row_headers=rows,
            col_headers=cols,
            key={
                "loras": file_identity([c.lora for c in ckpts]),
                "scales": scale_values,
                "prompts": texts,
                "positive": conditioning_identity(positive),
                "negative": conditioning_identity(negative),
                "preset": block_preset,
            },
        )
        return render_grid(model, vae, grid)


NODES = [KleinLabScrubRun]
