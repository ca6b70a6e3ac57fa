"""The run folder as ComfyUI's `loras` list sees it (the Train node registers the runs folder there)."""

from __future__ import annotations

from pathlib import Path

import torch
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.settings import TrainSettings


def test_loras_list_offers_checkpoints_not_resume_state(comfy_root: Path, tmp_path: Path) -> None:
    """ComfyUI's own extension filter keeps every LoRA checkpoint of a run and none of its resume-state files,
    so a user picking from a stock LoRA loader can only pick a LoRA."""
    import folder_paths

    run = RunFolder.create(tmp_path / "run", TrainSettings(), {})
    for step in (10, 20):
        run.save_state(step, {"w": torch.zeros(2)}, {"step": step})
        run.checkpoint_path(step).write_bytes(b"")
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    offered = folder_paths.filter_files_extensions(names, folder_paths.supported_pt_extensions)
    assert sorted(offered) == ["step_000010.safetensors", "step_000020.safetensors"]
    assert len(names) == 4
