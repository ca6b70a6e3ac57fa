"""The demo (scripts/demo.py) end to end at the smallest settings: it trains, writes a run folder, and samples.

This guards the main job against changes in the training path it drives (settings, run folder, ComfyUI glue).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.comfy_env import PACK_ROOT

TRAIN_STEPS = 4


def test_demo_trains_and_writes_a_run_folder(comfy_root, tmp_path) -> None:
    """With ComfyUI: a run folder with one metrics line per step, checkpoints, loss curve, and base/LoRA samples."""
    out = tmp_path / "demo-output"
    cmd = [sys.executable, str(PACK_ROOT / "scripts" / "demo.py"), "--out", str(out)]
    cmd += ["--size", "32", "--steps", "2", "--seeds", "5", "--train-steps", str(TRAIN_STEPS)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "COMFYUI_PATH": str(comfy_root)}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    run_dir = out / "klein_lora_lab" / "runs" / summary["run_dir"].rsplit("/", 1)[-1]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, TRAIN_STEPS + 1))
    assert len(summary["checkpoints"]) == TRAIN_STEPS and all(os.path.isfile(p) for p in summary["checkpoints"])
    assert (run_dir / "loss_curve.png").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["base_seed_5.png", "lora_seed_5.png"]
    assert set(summary["distance_to_album"]) == {"base", "lora"}
    assert "Trained a LoRA" in proc.stdout
