"""Train a Klein LoRA on the MODEL ComfyUI loaded: presets, live loss and previews, Cancel keeps the run."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.analysis.loss_curve import run_loss_curve
from ...trainer_core.errors import check_number
from ...trainer_core.training.options import TrainingOptions, keep_run_options, with_options
from ...trainer_core.training.sampling import CFG_MAX, CFG_MIN
from ...trainer_core.training.spawn import parse_devices
from ..comfy.data_parallel import data_parallel_settings
from ..comfy.interrupt import raise_interrupt
from ..comfy.paths import lora_list_name
from ..comfy.run_outputs import output_fingerprint, record_output
from ..comfy.sockets import ENCODED_DATASET
from ..comfy.train_setup import clinic_setup, new_or_resumed_run, sample_config, settings_from_widgets
from ..comfy.training import model_with_lora, train_in_comfy, ui_image
from ..comfy.training_options import TRAINING_OPTIONS
from ..comfy.widgets import training_widgets


class KleinLabTrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabTrainLora",
            display_name="Klein Train LoRA",
            category="Klein LoRA Lab/train",
            description=(
                "Trains a LoRA on the loaded Klein Base model. Watch the loss and the previews; press Cancel at the "
                "sweet spot: the run is kept and a later run with resume on continues exactly where it stopped."
            ),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.2 [klein] Base from 'Load Diffusion Model' (trained in place)."),
                ENCODED_DATASET.Input("encoded_dataset", tooltip="From 'Klein Encode Dataset (cached)'."),
                *training_widgets(
                    [
                        io.String.Input(
                            "run_name",
                            default="klein_lora",
                            tooltip="Folder of this run under output/klein_lora_lab/runs.",
                        ),
                        io.Boolean.Input(
                            "resume",
                            default=False,
                            tooltip="Continue the run of this name from its last checkpoint (after Stop & keep or "
                            "Cancel); to extend a finished run, raise steps.",
                        ),
                    ]
                ),
                io.Boolean.Input(
                    "stop_at_sweet_spot",
                    default=False,
                    optional=True,
                    tooltip="Stop the run by itself once the live clinic marks the sweet spot (concept near its best "
                    "while flexibility falls, memorisation, or the concept leaking without trigger). Every "
                    "checkpoint is kept and the suggested one is named. Needs previews (sample_every) and 2+ "
                    "validation prompts.",
                ),
                io.Int.Input(
                    "stop_after_validations",
                    default=1,
                    min=0,
                    max=20,
                    optional=True,
                    tooltip="With stop_at_sweet_spot: how many validations after the mark to keep training (0 = stop "
                    "at the mark; 1 = one more look to confirm it).",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Decode previews with this VAE; without it previews are a rough latent view.",
                ),
                TRAINING_OPTIONS.Input(
                    "options",
                    optional=True,
                    tooltip="From 'Klein Training Options' (memory, optimizer, schedule, EMA, ...). Without it: "
                    "memory auto and the preset's choices; a resumed run keeps its own.",
                ),
                io.String.Input(
                    "devices",
                    default="",
                    optional=True,
                    tooltip="Empty: train on the MODEL's device, as always. 'cuda:0, cuda:1' (or 'auto' = every GPU): "
                    "one run spread over the GPUs, one process each loading the same model file; batch_size is "
                    "per GPU (the run trains with batch_size × GPUs). No previews or live panel meanwhile.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.String.Output(display_name="lora_name"),
                io.Image.Output(display_name="loss_curve"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run_name: str, **kwargs) -> str:
        # A run folder deleted or changed by hand re-executes the node instead of answering "Finished" from cache.
        return output_fingerprint(run_name)

    @classmethod
    def execute(
        cls,
        model,
        encoded_dataset: EncodedDataset,
        preset: str,
        run_name: str,
        resume: bool,
        sample_steps: int,
        sample_cfg: float,
        vae=None,
        options: TrainingOptions | None = None,
        stop_at_sweet_spot: bool = False,
        stop_after_validations: int = 1,
        devices: str = "",
        **widgets,
    ) -> io.NodeOutput:
        on = parse_devices(devices)
        settings = data_parallel_settings(with_options(settings_from_widgets(preset, **widgets), options), on)
        check_number(sample_cfg, "sample_cfg", CFG_MIN, CFG_MAX)  # before the run folder exists (NaN passes min/max)
        run = new_or_resumed_run(run_name, settings, encoded_dataset, resume)
        if resume:  # which items train was decided when the run started: keep its held-out share
            settings = replace(settings, validation_holdout=run.settings.validation_holdout)
            settings = settings if options is not None else keep_run_options(settings, run.settings)
        samples = sample_config(encoded_dataset, sample_steps, sample_cfg, settings.seed)
        outcome = train_in_comfy(
            model,
            encoded_dataset.items,
            settings,
            run,
            resume,
            cls.hidden.unique_id,
            samples,
            encoded_dataset.empty_context,
            vae,
            clinic_setup(encoded_dataset, stop_at_sweet_spot, stop_after_validations),
            devices=on,
        )
        if outcome.interrupted:
            raise_interrupt()
        record_output(run_name, run.path, outcome.checkpoint)
        curve = run_loss_curve(run, 768, 384, 0.9)
        lora_name = lora_list_name(outcome.checkpoint)
        trained = model_with_lora(model, lora_name)
        ui = {"text": [outcome.message], "images": [ui_image(p) for p in outcome.sample_files[-8:]]}
        return io.NodeOutput(trained, lora_name, curve, ui=ui)


NODES = [KleinLabTrainLora]
