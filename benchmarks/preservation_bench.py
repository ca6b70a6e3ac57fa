"""Preservation on the tiny Klein (CPU): trigger-free drift with and without it, at the concept strength reached,
and what it costs per step.

The album is constructed (tests/harness/preservation.py): captions "TOK, a photo of <subject>", latents one
concept pattern, and validation prompts as the live clinic reads them ("a photo of TOK", the bicycle test, two
prompts without the trigger). At every validation the prompts are sampled at one fixed seed with the LoRA and
with the base model, and measured with the clinic's own measure (live_clinic.measure_validation): concept
strength and trigger-free drift. Each configuration trains the same steps from the same seed.

    OMP_NUM_THREADS=1 python benchmarks/preservation_bench.py --steps 120 --every 15

Prints one JSON line per validation and a markdown table: concept and drift averaged over the last
`--last` validations, and the mean seconds per optimizer step. The seconds come from separate short runs
without validations, the configurations taking turns (`--timing-rounds` rounds of `--timing-steps` steps), so a
busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.pack import register_pack  # noqa: E402

register_pack()

from harness.preservation import SPEC, clinic_record, constructed_album  # noqa: E402
from klein_lora_lab.trainer_core.model.tiny import tiny_klein  # noqa: E402
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder  # noqa: E402
from klein_lora_lab.trainer_core.training.settings import TrainSettings  # noqa: E402
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train  # noqa: E402

CONFIGS = {
    "off": (0.0, 0.5),
    "weight 1, share 0.5": (1.0, 0.5),
    "weight 2, share 0.5": (2.0, 0.5),
    "weight 1, share 1": (1.0, 1.0),
}


class Clinic(TrainCallbacks):
    """The clinic's measures of each validation, against the base model."""

    def __init__(self, model, album, label: str) -> None:
        self.model, self.album, self.label = model, album, label
        self.records: list[dict] = []

    def on_validation(self, step: int, lora) -> None:
        record = clinic_record(self.model, self.album, lora, step)
        self.records.append(record)
        row = {k: record[k] for k in ("step", "concept", "trigger_free_drift", "flexibility")}
        print(json.dumps({"config": self.label, **row}), flush=True)


def settings_for(weight: float, share: float, steps: int, every: int, args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        rank=8,
        alpha=8,
        learning_rate=args.lr,
        steps=steps,
        batch_size=3,
        checkpoint_every=0,
        sample_every=every,
        targets="regex:.*",
        save_dtype="fp32",
        seed=args.seed,
        preservation_weight=weight,
        preservation_share=share,
    )


def run_config(label: str, weight: float, share: float, args: argparse.Namespace, folder: Path) -> dict:
    album = constructed_album()
    model = tiny_klein(SPEC)
    settings = settings_for(weight, share, args.steps, args.every, args)
    run = RunFolder.create(folder / label.replace(" ", "_").replace(",", ""), settings, {})
    clinic = Clinic(model, album, label)
    train(model, album.items, settings, run, clinic)
    last = clinic.records[-args.last :]
    return {
        "config": label,
        "concept": statistics.mean(r["concept"] for r in last),
        "drift": statistics.mean(r["trigger_free_drift"] for r in last),
    }


def step_seconds(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Mean seconds per optimizer step of each configuration, the configurations taking turns."""
    album = constructed_album()
    seconds: dict[str, list[float]] = {label: [] for label in CONFIGS}
    for round_ in range(args.timing_rounds):
        for label, (weight, share) in CONFIGS.items():
            settings = settings_for(weight, share, args.timing_steps, 0, args)
            run = RunFolder.create(folder / f"time{round_}_{len(seconds[label])}_{weight}_{share}", settings, {})
            train(tiny_klein(SPEC), album.items, settings, run)
            seconds[label] += [r["seconds"] for r in run.read_metrics()[1:]]  # the first step warms up
    # The mean, not the median: with a share below 1 the steps are of two kinds (with and without preservation).
    return {label: statistics.mean(values) for label, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=15, help="validation (sampling + clinic) every N steps")
    parser.add_argument("--last", type=int, default=4, help="validations averaged in the table")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_config(label, w, s, args, Path(tmp)) for label, (w, s) in CONFIGS.items()]
        timing = step_seconds(args, Path(tmp))
    for row in rows:
        row["s_per_step"] = timing[row["config"]]
    base = rows[0]["s_per_step"]
    print(
        f"\n{args.steps} steps, batch 3, rank 8, lr {args.lr:g}, tiny Klein on the CPU; the last {args.last} "
        f"validations averaged\n"
    )
    print("| preservation | concept strength | trigger-free drift | s/step | cost |")
    print("|---|---|---|---|---|")
    for r in rows:
        cost = r["s_per_step"] / base
        print(f"| {r['config']} | {r['concept']:.3f} | {r['drift']:.3f} | {r['s_per_step']:.3f} | {cost:.2f}× |")


if __name__ == "__main__":
    main()
