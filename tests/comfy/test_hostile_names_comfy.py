"""Hostile names and paths through a real server's /prompt: every node input that names a folder, run or file is
refused ('..', absolute paths outside, symlinks out, NUL bytes, very long or reserved names) and nothing outside
ComfyUI's folders is read or written.

Free-text inputs (album folders, run names, run paths) reach the pack's code and fail while executing with the
pack's UnsafePathError; selections (runs, LoRAs) are combos that ComfyUI's own validation rejects before anything
runs. A folder outside the server's base directory holds a secret file and an album: it must stay untouched, and no
file may appear outside the base directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, execution_error, train_prompt
from harness.server import ServerError
from PIL import Image


@pytest.fixture(scope="module")
def outside(comfy_server, tmp_path_factory) -> Path:
    """A folder outside the server's folders with an album and a secret in it, plus symlinks to it planted inside
    the input folder and the runs folder."""
    folder = tmp_path_factory.mktemp("outside")
    album = folder / "album"
    album.mkdir()
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(album / "000.png")
    (folder / "secret.txt").write_text("secret")
    base = comfy_server.base_dir
    (base / "input" / "linked_out").symlink_to(album, target_is_directory=True)
    runs = base / "output" / "klein_lora_lab" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "linked_run").symlink_to(folder, target_is_directory=True)
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _fails_with(server, prompt: dict, *words: str) -> str:
    error = execution_error(server, prompt)
    assert error["exception_type"].endswith(("UnsafePathError", "ValueError")), error
    message = error["exception_message"]
    for word in words:
        assert word in message, message
    return message


def hostile_paths(outside: Path) -> list[tuple[str, str]]:
    return [
        ("dot-dot", "../../../../../../etc"),
        ("dot-dot to the album", f"../{'../' * 8}{outside.relative_to('/')}/album"),
        ("absolute outside", str(outside / "album")),
        ("absolute root", "/"),
        ("symlink out", "linked_out"),
        ("NUL byte", "album\x00/../../etc"),
        ("very long", "a/" * 3000),
    ]


def _dataset_prompt(folder: str) -> dict:
    return {
        "4": {
            "class_type": "KleinLabDatasetFolder",
            "inputs": {
                "folder": folder,
                "trigger": "TOK",
                "trigger_mode": "prepend",
                "resolution": SIZE,
                "default_caption": "",
            },
        },
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def test_album_folders_cannot_leave_comfyui_folders(comfy_server, outside):
    """The album folder of the dataset, pairs and lint nodes refuses every hostile path with UnsafePathError naming
    the input; the outside folder is never read into a dataset nor changed."""
    before = _snapshot(outside)
    for _name, path in hostile_paths(outside):
        _fails_with(comfy_server, _dataset_prompt(path), "album folder")
        pairs = {
            "4": {
                "class_type": "KleinLabDatasetPairs",
                "inputs": {
                    "reference_folder": path,
                    "target_folder": "target",
                    "trigger": "TOK",
                    "trigger_mode": "prepend",
                    "resolution": SIZE,
                    "default_caption": "",
                },
            },
            "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
        }
        _fails_with(comfy_server, pairs, "album folder")
        lint = {
            "4": {
                "class_type": "KleinLabDatasetLint",
                "inputs": {"folder": path, "pairs_folder": "", "trigger": "TOK", "preset": "style", "resolution": 512},
            }
        }
        _fails_with(comfy_server, lint, "album folder")
    assert _snapshot(outside) == before


def test_loss_curve_run_path_cannot_leave_comfyui_folders(comfy_server, outside):
    """The loss-curve node's run (a name or a path) refuses '..', absolute paths outside, symlinked runs and NUL."""
    # 'linked_out' is relative to the input folder; the run's own symlink row is 'linked_run' (in the runs folder).
    rows = [row for row in hostile_paths(outside) if row[0] != "symlink out"] + [("symlinked run", "linked_run")]
    for _name, path in rows:
        inputs = {"run": path, "width": 400, "height": 200, "smoothing": 0.9}
        prompt = {"1": {"class_type": "KleinLabLossCurve", "inputs": inputs}}
        _fails_with(comfy_server, prompt, "run")


def _train_prompt(album: Path, run_name: str) -> dict:
    return train_prompt(album, tiny_conditioning_path(), run_name, 1, checkpoint_every=0, sample_every=0)


HOSTILE_RUN_NAMES = [
    "../escape",
    "../../../../../../tmp/klein_lab_escape",
    "/tmp/klein_lab_escape_abs",
    "sub/dir",
    "a\x00b",
    "x" * 300,
    "CON",
    ".hidden",
    "..",
    "linked_run",
]


def test_run_names_cannot_write_outside_the_runs_folder(comfy_server, outside):
    """The train node's run name refuses separators, '..', absolute paths, NUL, over-long and reserved names and a
    run folder symlinked out of the runs folder: each prompt fails naming the run name and nothing is written
    outside (no folder 'escape' next to runs/, nothing new in the outside folder or /tmp)."""
    album = comfy_server.base_dir / "input" / "hostile_album"
    album.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (SIZE, SIZE), (50 * i, 60, 70)).save(album / f"{i:03d}.png")
    before = _snapshot(outside)
    for name in HOSTILE_RUN_NAMES:
        _fails_with(comfy_server, _train_prompt(album, name), "run name")
    assert _snapshot(outside) == before
    lab = comfy_server.base_dir / "output" / "klein_lora_lab"
    assert not (lab / "escape").exists()
    assert not Path("/tmp/klein_lab_escape").exists() and not Path("/tmp/klein_lab_escape_abs").exists()


SELECTIONS = [
    ("KleinLabSweetSpot", "run", "../../../etc"),
    ("KleinLabDiagnoseRun", "run", "/etc"),
    ("KleinLabScrubRun", "run", "../linked_out"),
    ("KleinLabLoraLoaderBlocks", "lora_name", "../../../../etc/passwd"),
    ("KleinLabLoraMixer", "lora_1", "../../secret.safetensors"),
    ("KleinLabMixerGrid", "lora_a", "/etc/passwd"),
]


@pytest.mark.parametrize(("node", "field", "value"), SELECTIONS, ids=[f"{n}.{f}" for n, f, _ in SELECTIONS])
def test_run_and_lora_selections_are_validated_before_running(comfy_server, outside, node, field, value):
    """Run and LoRA selections are combos: a value that is not one of the listed runs/LoRAs is rejected by ComfyUI's
    validation (HTTP 400 naming the input), so no node code runs with it."""
    info = comfy_server.object_info()[node]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}
    kind = spec[field][0] if field in spec else None
    assert kind == "COMBO" or isinstance(kind, list), f"{node}.{field} is not a combo: {spec.get(field)}"
    prompt = {"1": {"class_type": node, "inputs": {field: value}}}
    if not comfy_server.object_info()[node]["output_node"]:  # a prompt needs an output: show the MODEL's info
        prompt["2"] = {"class_type": "KleinLabModelInfo", "inputs": {"model": ["1", 0]}}
    with pytest.raises(ServerError, match=rf"(?s)HTTP 400.*{field}"):
        comfy_server.queue_prompt(prompt)
