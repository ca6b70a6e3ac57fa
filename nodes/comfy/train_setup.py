"""What the Train and Sweep nodes share before training: settings from the widgets, the run folder (new, or the
existing one when resuming) and the validation previews' configuration."""

from __future__ import annotations

from collections import Counter

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.runs.runfolder import RunFolder
from ...trainer_core.training.settings import TrainSettings, preset
from ...trainer_core.training.trainer import check_preservation_contexts
from .live_panel import ClinicSetup
from .run_names import run_path
from .training import SampleConfig


def settings_from_widgets(preset_name: str, **widgets) -> TrainSettings:
    """The preset with every widget applied on top; a 0 in rank/alpha/learning_rate/steps keeps the preset's."""
    keep_preset = ("rank", "alpha", "learning_rate", "steps")
    overrides = {k: v for k, v in widgets.items() if not (k in keep_preset and v == 0)}
    # validation_every 0 (or absent) measures the validation loss whenever previews are taken, so the curve gets
    # a validation line.
    if not overrides.get("validation_every"):
        overrides["validation_every"] = widgets.get("sample_every", 0)
    return preset(preset_name, **overrides)


def new_or_resumed_run(run_name: str, settings: TrainSettings, encoded: EncodedDataset, resume: bool) -> RunFolder:
    """The run folder under <output>/klein_lora_lab/runs: a new one, or the existing one when resuming."""
    check_preservation_contexts(encoded.items, settings)  # before a folder exists: an album encoded before says so
    path = run_path(run_name)  # the same rule as the panel's routes
    name = path.name
    if (path / "run.json").is_file():
        if not resume:
            raise ValueError(
                f"run '{name}' already exists in {path}: turn resume on to continue it, or give a new run name."
            )
        return RunFolder.open(path)
    meta = {
        "trigger": encoded.trigger,
        "dataset_kind": encoded.kind,
        "album_hash": encoded.dataset_hash,
        "items": len(encoded.items),
        "validation_prompts": list(encoded.validation_prompts),
    }
    return RunFolder.create(path, settings, meta)


def sample_config(encoded: EncodedDataset, steps: int, cfg: float, seed: int) -> SampleConfig | None:
    """Previews at the album's most common latent size, fixed seed, the encoded validation prompts."""
    if steps == 0 or not encoded.validation_contexts:
        return None
    sizes = Counter(tuple(item.latent.shape[-2:]) for item in encoded.items)
    h, w = sizes.most_common(1)[0][0]
    first = next(item for item in encoded.items if tuple(item.latent.shape[-2:]) == (h, w))
    return SampleConfig(
        contexts=encoded.validation_contexts,
        negative=encoded.empty_context,
        latent_hw=(h, w),
        refs=first.refs,
        steps=steps,
        cfg=cfg if encoded.empty_context is not None else 1.0,
        seed=seed,
    )


def clinic_setup(encoded: EncodedDataset, stop_at_sweet_spot: bool, stop_after: int) -> ClinicSetup:
    """The live clinic of a run: the validation prompts, the trigger, the album's latents, the auto-stop."""
    return ClinicSetup(
        prompts=tuple(encoded.validation_prompts),
        trigger=encoded.trigger,
        album_latents=tuple(item.latent for item in encoded.items),
        stop_after=stop_after if stop_at_sweet_spot else None,
    )
