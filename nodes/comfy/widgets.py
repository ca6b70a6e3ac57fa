"""Widget builders and tooltips shared by several nodes, so one widget reads the same on every node."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ...trainer_core.album.dataset import TRIGGER_MODES
from ...trainer_core.model.block_weights import PRESETS
from ...trainer_core.model.variants import GROUPS, SAMPLING_CHOICES
from ...trainer_core.training.settings import PRESETS as TRAIN_PRESETS
from .paths import lora_list

MAX_SEED = 0xFFFFFFFFFFFFFFFF
STRENGTH_MIN, STRENGTH_MAX = -4.0, 4.0

FOLDER_TIP = (
    "Album folder: an absolute path, or a path inside ComfyUI's input folder. "
    "Images: png/jpg/jpeg/webp; captions: same-name .txt files."
)
TRIGGER_TIP = "Trigger word the LoRA learns (e.g. TOK, TOKSTYLE). '[trigger]' inside a caption is replaced by it."
MODE_TIP = "Where the trigger goes when a caption lacks it: prepend ('TOK, caption'), append, or none."
RESOLUTION_TIP = (
    "Base resolution: every image goes to an aspect bucket of about this many pixels² (sides are multiples "
    "of 16). 512 trains fast; 1024 is Klein's native size."
)
DEFAULT_CAPTION_TIP = (
    "Caption for images without a .txt file (the trigger is added). "
    "Empty: such images get the trigger alone, with a warning in the summary."
)


# ------------------------------------------------------------------------------------------------ albums


def trigger_inputs() -> list[io.Input]:
    """Trigger, trigger mode, bucket resolution and default caption (the folder and pairs dataset nodes)."""
    return [
        io.String.Input("trigger", default="TOK", tooltip=TRIGGER_TIP),
        io.Combo.Input("trigger_mode", options=list(TRIGGER_MODES), default="prepend", tooltip=MODE_TIP),
        io.Int.Input("resolution", default=512, min=16, max=4096, step=16, tooltip=RESOLUTION_TIP),
        io.String.Input("default_caption", default="", tooltip=DEFAULT_CAPTION_TIP),
    ]


# ------------------------------------------------------------------------------------------------ LoRAs


def lora_combo(name: str, tooltip: str, none_option: str | None = None) -> io.Combo.Input:
    """A LoRA of ComfyUI's loras list (the runs' checkpoints included); `none_option` first when given."""
    options = lora_list() if none_option is None else [none_option, *lora_list()]
    return io.Combo.Input(name, options=options, default=options[0] if options else None, tooltip=tooltip)


def strength_input(name: str, tooltip: str, default: float = 1.0) -> io.Float.Input:
    """A LoRA strength widget: −4..4, negative allowed (pushes away from the LoRA's concept)."""
    return io.Float.Input(name, default=default, min=STRENGTH_MIN, max=STRENGTH_MAX, step=0.05, tooltip=tooltip)


def group_strength_inputs() -> list[io.Float.Input]:
    """One strength widget per block group of the course's map."""
    return [
        strength_input(f"{group}_strength", f"Multiplier for the {group} blocks (used by presets 'all' and '{group}').")
        for group in GROUPS
    ]


def preset_input(name: str = "preset", custom: bool = True) -> io.Combo.Input:
    """The block preset combo; 'custom' (the per-block vector) only where the node has a vector widget."""
    return io.Combo.Input(
        name,
        options=[p for p in PRESETS if custom or p != "custom"],
        default="all",
        tooltip="Which blocks the LoRA acts on (course's map): all; binding = double blocks (trigger ↔ concept); "
        "texture = early single blocks; identity = middle single blocks; composition = late single blocks"
        + ("; custom = the per-block vector." if custom else "."),
    )


# ------------------------------------------------------------------------------------------------ runs


def run_combo(runs: list[str], tooltip: str) -> io.Combo.Input:
    """The run picker of the diagnostics nodes (an empty entry when no run exists yet)."""
    return io.Combo.Input("run", options=runs or [""], default=runs[0] if runs else "", tooltip=tooltip)


# ------------------------------------------------------------------------------------------------ rendering


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


def sampling_input() -> io.Combo.Input:
    """Base or distilled sampling of the frames; the last widget of a render node (so saved workflows keep the
    order of their earlier widgets)."""
    return io.Combo.Input(
        "sampling",
        options=list(SAMPLING_CHOICES),
        default=SAMPLING_CHOICES[0],
        optional=True,
        tooltip="as set: the steps and cfg widgets (Klein Base: ~50 steps, cfg ~4). distilled: 4 steps, cfg 1, "
        "what the distilled Klein is made for; connect a distilled Klein to model (a LoRA trained on Base loads "
        "on it unchanged). Nothing in the weights tells the two apart, so choose here.",
    )


def prompt_inputs() -> list:
    """clip + prompt lines, or a positive conditioning, and the optional negative (the scrub node)."""
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
        negative_input(),
    ]


def negative_input() -> io.Conditioning.Input:
    return io.Conditioning.Input(
        "negative",
        optional=True,
        tooltip="Negative conditioning; without it the empty prompt through clip, or none when cfg is 1.",
    )


# ------------------------------------------------------------------------------------------------ training

TRAIN_PRESET_TIP = (
    "The course's starting points, written for Klein 4B (rank / learning rate / steps): style 16 / 3e-4 / 650, "
    "character 32 / 2e-4 / 1000, object 24 / 2e-4 / 800, image_to_image 32 / 1e-4 / 400. Picking a preset fills "
    "rank, alpha, learning_rate and steps with its values; a value you edited stays yours."
)
LR_TIP = (
    "Learning rate; 0 = the preset's. The presets' 1e-4 to 3e-4 are the course's values for Klein 4B. The lab's "
    "detents were measured on 9B: 1e-5 timid, 5e-5 default, 2e-4 frantic, so on 9B start near 5e-5 and watch "
    "the samples; a larger model moves further per step."
)
SWEEP_NOTES = {
    "preset": " In a sweep: the starting point of every run; ignored when the knob is 'preset'.",
    "seed": " In a sweep: the same for every run, so the runs differ only by the knob.",
}


def _int(name: str, default: int, lo: int, hi: int, tip: str) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tip)


def training_widgets(run_widgets: list[io.Input] = (), sweep: bool = False) -> list[io.Input]:
    """The training widgets of the Train and Sweep nodes, in the order saved workflows hold them: preset, then
    `run_widgets` (the Train node's run_name and resume), then rank ... validation_holdout. A run of a sweep is
    the run these widgets train on the Train node, so both read the same; `sweep` adds what differs in a sweep.
    The two validation widgets are optional so API prompts written before they existed still run (absent:
    validation with every preview, no hold-out, as those runs trained)."""
    notes = SWEEP_NOTES if sweep else {}
    return [
        io.Combo.Input(
            "preset",
            options=list(TRAIN_PRESETS),
            default="style",
            tooltip=TRAIN_PRESET_TIP + notes.get("preset", ""),
        ),
        *run_widgets,
        _int("rank", 0, 0, 256, "LoRA rank; 0 = the preset's (filled in when you pick a preset)."),
        io.Float.Input(
            "alpha", default=0.0, min=0.0, max=1024.0, step=1.0, tooltip="LoRA alpha; 0 = the preset's (alpha = rank)."
        ),
        io.Float.Input("learning_rate", default=0.0, min=0.0, max=0.01, step=0.00001, round=0.000001, tooltip=LR_TIP),
        _int("steps", 0, 0, 100000, "Optimizer steps; 0 = the preset's (style 650, character 1000, ...)."),
        _int("batch_size", 1, 1, 64, "Images per step (same-size buckets are batched together)."),
        _int("checkpoint_every", 100, 0, 100000, "Save a LoRA every N steps (listed in the loras list); 0 = end only."),
        _int("sample_every", 100, 0, 100000, "Preview the validation prompts every N steps; 0 = no previews."),
        _int("sample_steps", 20, 0, 200, "Sampling steps of each preview (Klein Base: 50 for final images)."),
        io.Float.Input(
            "sample_cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip="CFG of the previews (Klein Base ~4)."
        ),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=2**31 - 1,
            # The frontend gives any INT named seed a "randomize after queue" control unless told not to; a
            # training seed must stay put (resume continues the same run, a sweep's runs share it) and saved
            # workflows stay aligned.
            control_after_generate=False,
            tooltip="Seed of the LoRA init, data order, noise and the previews." + notes.get("seed", ""),
        ),
        io.String.Input(
            "targets",
            default="attention",
            tooltip="Which layers train: attention (default), all_linear, block groups ('binding,identity'), "
            "'blocks:double.0,single.5-9' or 'regex:<pattern>'.",
        ),
        io.Int.Input(
            "validation_every",
            default=0,
            min=0,
            max=100000,
            optional=True,
            tooltip="Validation loss (fixed noise and σ) every N steps, on the loss curve; 0 = with every preview.",
        ),
        io.Float.Input(
            "validation_holdout",
            default=0.1,
            min=0.0,
            max=0.5,
            step=0.05,
            optional=True,
            tooltip="Share of an album of 10+ images held out of training for the validation loss (0 = train on "
            "all; smaller albums validate on training images). A resumed run keeps its own.",
        ),
    ]
