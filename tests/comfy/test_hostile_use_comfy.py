"""Hostile use through a real server's /prompt: album files linked from outside, a catastrophic target regex while
/queue is watched, NaN/Inf/absurd numbers that bypass the widgets' limits, broken LoRA files, an over-long value,
and a run folder deleted by hand before the same prompt is queued again.

Each row fails with the pack's own error, reported under its bare type name (`UnsafePathError`, not a module
path), or, for the deleted run, trains again instead of answering from ComfyUI's cache.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, execution_error, train_prompt, with_defaults
from PIL import Image


@pytest.fixture(scope="module")
def places(comfy_server, tmp_path_factory) -> dict[str, Path]:
    """An album in the input folder with a reference folder, a folder outside the server's folders with a secret
    and a PNG, and LoRA files in the loras folder: a good one, one of rank 0, one with alpha 1e30."""
    from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
    from klein_lora_lab.trainer_core.lora.lora_file import save_lora
    from klein_lora_lab.trainer_core.model.tiny import TinySpec
    from safetensors.torch import save_file

    base = comfy_server.base_dir
    outside = tmp_path_factory.mktemp("outside_hostile")
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n" * 3)
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(outside / "outside.png")
    album, refs = base / "input" / "hostile_use_album", base / "input" / "hostile_use_refs"
    for folder in (album, refs):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (SIZE, SIZE), (60 * i, 90, 30)).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"a square {i}")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    h = TinySpec().hidden
    good = {"double_blocks.0.img_attn.qkv": LoraWeights(torch.randn(2, h) * 0.01, torch.randn(3 * h, 2) * 0.01, 2.0)}
    save_lora(loras / "hostile_good.safetensors", good, {})
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(0, h), f"{key}.lora_B.weight": torch.zeros(3 * h, 0)},
        str(loras / "hostile_rank0.safetensors"),
    )
    save_file(
        {
            f"{key}.lora_A.weight": torch.full((2, h), 0.01),
            f"{key}.lora_B.weight": torch.full((3 * h, 2), 0.01),
            f"{key}.alpha": torch.tensor(1e30),
        },
        str(loras / "hostile_alpha.safetensors"),
    )
    return {"album": album, "refs": refs, "outside": outside}


def _fails(server, prompt: dict, type_name: str, *words: str) -> str:
    error = execution_error(server, prompt)
    assert error["exception_type"] == type_name, error["exception_type"]  # a bare name, never a module path
    message = error["exception_message"]
    for word in words:
        assert word in message, message[:2000]
    return message


def _dataset(folder: Path) -> dict:
    inputs = {"folder": str(folder), "trigger": "TOK", "trigger_mode": "prepend", "resolution": SIZE}
    return {
        "4": {"class_type": "KleinLabDatasetFolder", "inputs": {**inputs, "default_caption": ""}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def _pairs(refs: Path, targets: Path) -> dict:
    inputs = {"reference_folder": str(refs), "target_folder": str(targets), "trigger": "TOK", "trigger_mode": "prepend"}
    return {
        "4": {"class_type": "KleinLabDatasetPairs", "inputs": {**inputs, "resolution": SIZE, "default_caption": ""}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def _lint(folder: Path, refs: Path) -> dict:
    inputs = {"folder": str(folder), "pairs_folder": str(refs), "trigger": "TOK", "preset": "style", "resolution": 512}
    return {"4": {"class_type": "KleinLabDatasetLint", "inputs": inputs}}


LINKS = [("caption", "000.txt", "passwd"), ("image", "outside.png", "outside.png")]


@pytest.mark.parametrize(("what", "link", "target"), LINKS, ids=[r[0] for r in LINKS])
def test_album_files_linked_from_outside_are_refused(comfy_server, places, what, link, target) -> None:
    """A caption or image symlinked from outside every allowed folder into an album of the input folder (was: the
    35 words of /etc/passwd trained as a caption) is refused by the dataset, pairs and lint nodes with
    UnsafePathError naming the file and saying to copy it in; the outside words never show in the message."""
    for side in ("album", "refs"):
        planted = places[side] / link
        planted.unlink(missing_ok=True)
        planted.symlink_to(places["outside"] / target)
        try:
            prompts = [_pairs(places["refs"], places["album"]), _lint(places["album"], places["refs"])]
            if side == "album":
                prompts.append(_dataset(places["album"]))
            for prompt in prompts:
                message = _fails(comfy_server, prompt, "UnsafePathError", what, link, "copy the file")
                assert "root:x" not in message
        finally:
            planted.unlink()
    if link == "000.txt":  # the caption was a real file before: put it back for the next rows
        (places["album"] / link).write_text("a square 0")
        (places["refs"] / link).write_text("a square 0")


def _train(places, run_name: str, **inputs) -> dict:
    prompt = train_prompt(places["album"], tiny_conditioning_path(), run_name, 1, checkpoint_every=0, sample_every=0)
    prompt["6"]["inputs"].update(inputs)
    return prompt


class _QueueWatch:
    """Polls GET /queue in a thread and records how long each answer took (a hung server answers late or never)."""

    def __init__(self, server) -> None:
        self.server, self.latencies, self.failures = server, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                self.server.get_json("/queue", timeout=15)
            except OSError:
                self.failures += 1
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.05)

    def __enter__(self) -> _QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _node_seconds(entry: dict) -> float:
    """Seconds from the prompt's execution_start to its execution_error, from the server's own timestamps (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_error"] - stamps["execution_start"]) / 1000.0


HOSTILE_TARGETS = [
    ("catastrophic regex", "regex:(.*.*)*X", "matches no Linear module"),
    ("backtracking alternation", "regex:(a|aa)*(a|aa)*(a|aa)*$X", "matches no Linear module"),
    ("lookahead", "regex:(?=double).*", "not supported"),
    ("2 MB value", "x" * 2_000_000, "2000000 characters"),
]


def test_hostile_target_regexes_fail_fast_and_the_server_keeps_answering(comfy_server, places) -> None:
    """With the graph above the Train node cached, a catastrophic `regex:` target (was: one core at 100%, /queue
    silent for 10 s, /interrupt unanswered, the server killed) fails with the pack's message while a thread polls
    GET /queue: every poll answers, the slowest under 5 s. A 2 MB targets value comes back cut (was 2 MB, twice).
    Figures are printed: the Train node's time to the error and the /queue latencies."""
    comfy_server.run_prompt(with_defaults(comfy_server, _train(places, "regex_warm")), timeout_s=300)
    for name, targets, words in HOSTILE_TARGETS:
        prompt = with_defaults(comfy_server, _train(places, f"regex_{len(targets)}", targets=targets))
        with _QueueWatch(comfy_server) as watch:
            prompt_id = comfy_server.queue_prompt(prompt)
            entry = comfy_server.wait_history(prompt_id, timeout_s=120)
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["exception_type"] in ("SettingsError", "ValueError"), errors
        message = errors[0]["exception_message"]
        assert words in message and len(message) < 2000, message[:500]
        assert watch.failures == 0 and watch.latencies, (watch.failures, len(watch.latencies))
        slowest = max(watch.latencies)
        print(
            f"\n{name}: error after {_node_seconds(entry):.3f} s of execution; /queue polled "
            f"{len(watch.latencies)} times, median {sorted(watch.latencies)[len(watch.latencies) // 2] * 1000:.1f} ms, "
            f"slowest {slowest * 1000:.1f} ms"
        )
        assert slowest < 5.0, slowest


def _loader(lora: str, **inputs) -> dict:
    widgets = {"strength": 1.0, "preset": "all", "global_strength": 1.0, "block_vector": "", **inputs}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_klein.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "KleinLabLoraLoaderBlocks", "inputs": {"model": ["1", 0], "lora_name": lora, **widgets}},
        "3": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["2", 0]}},
    }


NAN = float("nan")
BAD_NUMBERS = [
    ("strength NaN", _loader("hostile_good.safetensors", strength=NAN), "ValueError", ("strength", "nan")),
    ("binding strength NaN", _loader("hostile_good.safetensors", binding_strength=NAN), "ValueError", ("binding",)),
    ("global strength NaN", _loader("hostile_good.safetensors", global_strength=NAN), "ValueError", ("global",)),
    (
        "vector nan",
        _loader("hostile_good.safetensors", preset="custom", block_vector="nan " * 25),
        "ValueError",
        ("block vector item 1",),
    ),
    (
        "vector infinity",
        _loader("hostile_good.safetensors", preset="custom", block_vector="infinity " * 25),
        "ValueError",
        ("block vector item 1",),
    ),
    (
        "vector 1e308",
        _loader("hostile_good.safetensors", preset="custom", block_vector="1e308 " * 25),
        "ValueError",
        ("block vector item 1",),
    ),
    ("rank 0 file", _loader("hostile_rank0.safetensors"), "LoraFormatError", ("hostile_rank0.safetensors", "rank 0")),
    (
        "alpha 1e30 file",
        _loader("hostile_alpha.safetensors"),
        "LoraFormatError",
        ("hostile_alpha.safetensors", "1e+30"),
    ),
]


@pytest.mark.parametrize(
    ("prompt", "type_name", "words"), [r[1:] for r in BAD_NUMBERS], ids=[r[0] for r in BAD_NUMBERS]
)
def test_non_finite_numbers_and_broken_loras_through_prompt_are_refused(comfy_server, places, prompt, type_name, words):
    """NaN strengths pass ComfyUI's min/max check (every comparison with NaN is false) and block vectors are text:
    the loader node refuses them by name, as it refuses a LoRA file of rank 0 (was ZeroDivisionError) and one with
    alpha 1e30 (was a silent non-finite output)."""
    _fails(comfy_server, prompt, type_name, *words)


def test_nan_sample_cfg_is_refused_before_training(comfy_server, places) -> None:
    """sample_cfg NaN (was: trained with black previews) fails before the run folder is made, naming sample_cfg,
    so the same run name trains once the value is fixed."""
    prompt = _train(places, "nan_cfg", sample_cfg=NAN, sample_every=1)
    _fails(comfy_server, prompt, "ValueError", "sample_cfg")
    assert not (comfy_server.base_dir / "output" / "klein_lora_lab" / "runs" / "nan_cfg").exists()


def test_a_deleted_run_trains_again_instead_of_answering_from_cache(comfy_server, places) -> None:
    """A run folder deleted by hand, then the identical prompt queued again: the Train node runs again (was:
    ComfyUI's cached 'Finished ... step_000001.safetensors' for a folder that did not exist) and the run is back.
    Queued once more with the folder in place, the cached answer still stands (no second training)."""
    prompt = with_defaults(comfy_server, _train(places, "deleted_run"))
    run = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs" / "deleted_run"
    comfy_server.run_prompt(prompt, timeout_s=300)
    assert (run / "checkpoints" / "step_000001.safetensors").is_file()
    shutil.rmtree(run)
    comfy_server.run_prompt(prompt, timeout_s=300)
    checkpoint = run / "checkpoints" / "step_000001.safetensors"
    assert checkpoint.is_file(), "the cached result was reused for a deleted run"
    mtime = checkpoint.stat().st_mtime_ns
    comfy_server.run_prompt(prompt, timeout_s=300)  # unchanged folder: answered from the cache, nothing rewritten
    assert checkpoint.stat().st_mtime_ns == mtime
