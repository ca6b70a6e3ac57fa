"""Klein Sweep: one knob, a list of values, one training run per value on the loaded model, everything else
identical (same album, data order, seed and validation prompts): the lab's real trainings as one node."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.runs.sweep import knobs
from ...trainer_core.training.spawn import parse_devices
from ..comfy.interrupt import raise_interrupt
from ..comfy.paths import lora_list_name
from ..comfy.sockets import ENCODED_DATASET
from ..comfy.sweeps import SWEEP, load_sweep, manifest_fingerprint, sweep_plan, train_sweep
from ..comfy.widgets import training_widgets


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
                *training_widgets(sweep=True),
                io.Vae.Input("vae", optional=True, tooltip="Decode the previews with this VAE."),
                io.String.Input(
                    "devices",
                    default="auto",
                    optional=True,
                    tooltip="auto (the default): with two or more GPUs visible, one run per GPU at the same time, "
                    "each in its own process loading the same model file (Cancel stops them all and keeps every "
                    "run; workers render no previews); with one GPU, the runs train one after another in ComfyUI. "
                    "'cuda:0, cuda:1': those GPUs. Empty: always one after another in ComfyUI.",
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
        devices: str = "auto",
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
