"""Klein Sweep: one knob, a list of values, one training run per value on the loaded model, everything else
identical (same album, data order, seed and validation prompts): the lab's real trainings as one node."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.runs.sweep import knobs
from ...trainer_core.training.settings import PRESETS
from ...trainer_core.training.spawn import parse_devices
from ..comfy.interrupt import raise_interrupt
from ..comfy.paths import lora_list_name
from ..comfy.sockets import ENCODED_DATASET
from ..comfy.sweeps import SWEEP, load_sweep, manifest_fingerprint, sweep_plan, train_sweep


def _int(name: str, default: int, lo: int, hi: int, tip: str) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tip)


def base_inputs() -> list:
    """The Train node's widgets with the Train node's defaults: a run of the sweep is the run those widgets train,
    with the knob set to its value."""
    return [
        io.Combo.Input(
            "preset",
            options=list(PRESETS),
            default="style",
            tooltip="The course's starting point for every run (style 16/3e-4, character 32/2e-4, object 24/2e-4, "
            "image_to_image 32/1e-4); ignored when the knob is 'preset'.",
        ),
        _int("rank", 0, 0, 256, "LoRA rank of every run; 0 = the preset's."),
        io.Float.Input(
            "alpha", default=0.0, min=0.0, max=1024.0, step=1.0, tooltip="LoRA alpha; 0 = the preset's (= rank)."
        ),
        io.Float.Input(
            "learning_rate",
            default=0.0,
            min=0.0,
            max=0.01,
            step=0.00001,
            round=0.000001,
            tooltip="0 = the preset's. The lab: 1e-5 timid, 5e-5 default, 2e-4 frantic.",
        ),
        _int("steps", 0, 0, 100000, "Optimizer steps of every run; 0 = the preset's."),
        _int("batch_size", 1, 1, 64, "Images per step."),
        _int("checkpoint_every", 100, 0, 100000, "Save a LoRA every N steps; 0 = end only."),
        _int("sample_every", 100, 0, 100000, "Preview the validation prompts every N steps; 0 = no previews."),
        _int("sample_steps", 20, 0, 200, "Sampling steps of each preview."),
        io.Float.Input("sample_cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip="CFG of the previews."),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=2**31 - 1,
            control_after_generate=False,  # the same seed for every run and every queue: the sweep stays comparable
            tooltip="Seed of every run: LoRA init, data order, noise and previews (fixed across the sweep).",
        ),
        io.String.Input("targets", default="attention", tooltip="Which layers train (as on the Train node)."),
        _int("validation_every", 0, 0, 100000, "Validation loss every N steps; 0 = with every preview."),
        io.Float.Input(
            "validation_holdout",
            default=0.1,
            min=0.0,
            max=0.5,
            step=0.05,
            tooltip="Share of an album of 10+ images held out for the validation loss (the same for every run).",
        ),
    ]


class KleinLabSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabSweep",
            display_name="Klein Sweep",
            category="Klein LoRA Lab/train",
            description=(
                "Trains one run per value of one knob, in sequence on the loaded model, everything else identical "
                "(album, data order, seed, validation prompts). Cancel keeps the finished runs and the current "
                "one; queueing again continues the sweep. Connect the sweep to Scrub Checkpoints or Sweep Curves."
            ),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.2 [klein] Base from 'Load Diffusion Model'."),
                ENCODED_DATASET.Input("encoded_dataset", tooltip="From 'Klein Encode Dataset (cached)'."),
                io.String.Input(
                    "sweep_name",
                    default="lr_sweep",
                    tooltip="Name of the sweep; each run is the folder '<sweep_name>-<knob>-<value>' under "
                    "output/klein_lora_lab/runs. Letters, digits, '_', '-' and '.'.",
                ),
                io.Combo.Input(
                    "knob",
                    options=knobs(),
                    default="learning_rate",
                    tooltip="The one setting that changes from run to run (every training setting can be swept).",
                ),
                io.String.Input(
                    "values",
                    default="1e-5, 5e-5, 2e-4",
                    tooltip="The knob's values, one run each, in this order: separated by commas, ';' or lines "
                    "(targets and presets by ';' or lines). The lab's lr: 1e-5 timid, 5e-5 default, 2e-4 frantic.",
                ),
                *base_inputs(),
                io.Vae.Input("vae", optional=True, tooltip="Decode the previews with this VAE."),
                io.String.Input(
                    "devices",
                    default="",
                    optional=True,
                    tooltip="Empty: the runs train one after another in ComfyUI, as always. 'cuda:0, cuda:1' (or "
                    "'auto' = every GPU): one run per GPU at the same time, each in its own process loading the "
                    "same model file; Cancel stops them all and keeps every run. Workers render no previews.",
                ),
            ],
            outputs=[
                SWEEP.Output(display_name="sweep", tooltip="The runs of the sweep, with the knob and values."),
                io.String.Output(display_name="lora_name", tooltip="Last checkpoint of the sweep's last run."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        model,
        encoded_dataset: EncodedDataset,
        sweep_name: str,
        knob: str,
        values: str,
        preset: str,
        sample_steps: int,
        sample_cfg: float,
        vae=None,
        devices: str = "",
        **widgets,
    ) -> io.NodeOutput:
        plan = sweep_plan(sweep_name, knob, values, preset, widgets)
        on = parse_devices(devices)
        outcome = train_sweep(model, encoded_dataset, plan, sample_steps, sample_cfg, cls.hidden.unique_id, vae, on)
        if outcome.interrupted:
            raise_interrupt()
        lora_name = lora_list_name(outcome.last_checkpoint) if outcome.last_checkpoint else ""
        return io.NodeOutput(outcome.sweep, lora_name, ui={"text": [outcome.message]})


class KleinLabLoadSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabLoadSweep",
            display_name="Klein Load Sweep",
            category="Klein LoRA Lab/train",
            description="A sweep trained earlier, by its name (output/klein_lora_lab/runs/<name>.sweep.json): "
            "scrub or chart it without training again.",
            inputs=[
                io.String.Input("sweep_name", default="lr_sweep", tooltip="The sweep_name it was trained with."),
            ],
            outputs=[SWEEP.Output(display_name="sweep", tooltip="The runs of the sweep, with the knob and values.")],
        )

    @classmethod
    def fingerprint_inputs(cls, sweep_name: str) -> str:
        return manifest_fingerprint(sweep_name)  # a sweep trained again (more values) is read again

    @classmethod
    def execute(cls, sweep_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_sweep(sweep_name))


NODES = [KleinLabSweep, KleinLabLoadSweep]
