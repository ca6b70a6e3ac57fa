"""Hostile use of the training core: files linked in from outside, catastrophic regexes, non-finite and absurd
numbers, broken LoRA files, a full disk under the encode cache, damaged run folders, over-long values.

Every row must end in the pack's own error naming the value or file (or, for damaged runs, in a resume that says
what it did); nothing outside the allowed folders is read, and no row takes more than a second of matching.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.album.dataset import scan_folder, scan_pairs
from klein_lora_lab.trainer_core.album.dataset_lint import lint_album
from klein_lora_lab.trainer_core.album.latent_cache import LatentCache
from klein_lora_lab.trainer_core.analysis.scrub import ScrubError, parse_scales
from klein_lora_lab.trainer_core.errors import shown
from klein_lora_lab.trainer_core.files.atomic import DiskFullError, atomic_write_with
from klein_lora_lab.trainer_core.files.safe_paths import UnsafePathError
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, LoraWeights
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError, read_lora_file
from klein_lora_lab.trainer_core.model.block_weights import block_strengths, module_strengths, parse_block_vector
from klein_lora_lab.trainer_core.model.klein import read_shape
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, RunFolderError
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.sampling import sample
from klein_lora_lab.trainer_core.training.settings import SettingsError, TrainSettings
from klein_lora_lab.trainer_core.training.trainer import train
from PIL import Image
from safetensors.torch import save_file

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
SIZE = 32

# ------------------------------------------------------------------------------------ files linked from outside


@pytest.fixture
def linked(tmp_path: Path) -> dict[str, Path]:
    """An allowed folder with an album (and a reference album for pairs) holding two real images, plus, outside
    the allowed folder, a secret text and a PNG; the tests plant links to them inside the albums."""
    allowed, outside = tmp_path / "input", tmp_path / "outside"
    for folder in (allowed / "album", allowed / "refs", outside):
        folder.mkdir(parents=True)
    for i in range(2):
        for side in ("album", "refs"):
            Image.new("RGB", (SIZE, SIZE), (40 * i, 90, 10)).save(allowed / side / f"{i:03d}.png")
    (outside / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash secret words that must never train\n")
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(outside / "outside.png")
    return {"allowed": allowed, "album": allowed / "album", "refs": allowed / "refs", "outside": outside}


LINKS = [
    ("caption linked out", "album", "000.txt", "secret.txt", "caption"),
    ("image linked out", "album", "outside.png", "outside.png", "image"),
    ("reference image linked out", "refs", "002.png", "outside.png", "image"),
    ("reference caption linked out", "refs", "001.txt", "secret.txt", "caption"),
]
READERS: dict[str, Callable[[dict[str, Path]], object]] = {
    "dataset": lambda f: scan_folder(f["album"], SIZE, roots=[f["allowed"]]),
    "pairs": lambda f: scan_pairs(f["refs"], f["album"], SIZE, roots=[f["allowed"]]),
    "lint": lambda f: lint_album(f["album"], pairs_folder=f["refs"], resolution=SIZE, roots=[f["allowed"]]),
    "dataset, default roots": lambda f: scan_folder(f["album"], SIZE),
}


@pytest.mark.parametrize(("row", "reader"), [(r, k) for r in LINKS for k in READERS], ids=lambda v: str(v)[:30])
def test_files_linked_from_outside_are_refused_by_name(linked, row, reader) -> None:
    """A caption or image inside an album (or its reference folder) that is a symlink to a file outside the allowed
    folders is refused by the dataset, pairs and lint readers with UnsafePathError naming the link and saying to
    copy the file in; the outside file's words never reach a caption."""
    _name, side, link, target, what = row
    (linked[side] / link).symlink_to(linked["outside"] / target)
    if side == "album" or reader in ("pairs", "lint"):
        with pytest.raises(UnsafePathError) as info:
            READERS[reader](linked)
        message = str(info.value)
        assert what in message and link in message and "copy the file" in message, message
        assert "secret words" not in message
    else:  # the folder and default-roots readers do not open the reference folder: nothing to refuse
        result = READERS[reader](linked)
        assert all("secret" not in c for c in result.captions())


def test_links_inside_the_allowed_folders_are_still_read(linked) -> None:
    """A link from the album to another file inside the allowed folders stays usable (only the outside is
    refused): the refs' image linked into the album trains with the album."""
    (linked["album"] / "009.png").symlink_to(linked["refs"] / "000.png")
    assert len(scan_folder(linked["album"], SIZE, roots=[linked["allowed"]])) == 3


def test_checkpoints_and_cache_entries_linked_from_outside_are_refused(tmp_path: Path, linked) -> None:
    """A checkpoint planted in a run's checkpoints folder and an encode-cache entry that link outside are refused
    by name instead of being loaded."""
    run = RunFolder.create(tmp_path / "run", TrainSettings(), {})
    (run.checkpoints_dir / "step_000009.safetensors").symlink_to(linked["outside"] / "secret.txt")
    with pytest.raises(UnsafePathError, match="checkpoint of run run"):
        run.checkpoints()
    cache = LatentCache(tmp_path / "cache")
    key = "ab" * 32
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).symlink_to(linked["outside"] / "secret.txt")
    with pytest.raises(UnsafePathError, match="encode cache entry"):
        cache.get(key)


# ------------------------------------------------------------------------------------------------- regexes

HOSTILE_REGEXES = [
    ("nested stars", "regex:(.*.*)*X", "matches no Linear module"),
    ("alternation star", "regex:(a|a|aa)*(b|a)*$X", "matches no Linear module"),
    ("many stars", "regex:" + ".*" * 40 + "X", "matches no Linear module"),
    ("backreference", r"regex:(double)\1", "not supported"),
    ("lookahead", "regex:(?=double).*", "not supported"),
    ("huge repeat", "regex:(a{1000}){1000}", "cannot be used"),
    ("2 MB", "regex:" + "a" * 2_000_000, "longer than 1000 characters"),
]


@pytest.mark.parametrize(("pattern", "words"), [r[1:] for r in HOSTILE_REGEXES], ids=[r[0] for r in HOSTILE_REGEXES])
def test_hostile_target_regexes_end_fast_with_an_error(pattern: str, words: str) -> None:
    """Catastrophic-backtracking patterns (which `re` would match for hours), backreferences, lookaround, huge
    repeats and a 2 MB pattern all end in an error within a second, in settings validation or against the model's
    module names; the message quotes the pattern cut short (under 1000 characters in all)."""
    model = tiny_klein(SPEC)
    started = time.perf_counter()
    with pytest.raises(ValueError) as info:
        TrainSettings(targets=pattern)
        resolve_targets(model, pattern)
    elapsed = time.perf_counter() - started
    assert words in str(info.value), str(info.value)[:500]
    assert len(str(info.value)) < 1000
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_a_valid_regex_still_selects_modules() -> None:
    """The linear-time engine keeps `regex:` working: fullmatch over the model's module names."""
    chosen = resolve_targets(tiny_klein(SPEC), r"regex:single_blocks\.0\.linear[12]")
    assert list(chosen) == ["single_blocks.0.linear1", "single_blocks.0.linear2"]


# ------------------------------------------------------------------------------------------------- numbers

NAN, INF = float("nan"), float("inf")
SHAPE = read_shape(tiny_klein(SPEC))


def _stack_with(strength: float, mult: float = 1.0) -> None:
    w = {"double_blocks.0.img_attn.qkv": LoraWeights(torch.zeros(2, 128), torch.zeros(384, 2), 2.0)}
    AdapterStack().set_lora("x", w, strength, {"double_blocks.0.img_attn.qkv": mult})


BAD_NUMBERS: list[tuple[str, Callable[[], object], str]] = [
    ("block vector nan", lambda: parse_block_vector("1, nan"), "block vector item 2"),
    ("block vector infinity", lambda: parse_block_vector("infinity 1"), "block vector item 1"),
    ("block vector 1e308", lambda: parse_block_vector("1e308, 1"), "block vector item 1"),
    ("block vector list nan", lambda: block_strengths(SHAPE, "custom", block_vector=[NAN, 1.0]), "block vector item"),
    ("group strength nan", lambda: block_strengths(SHAPE, "all", {"binding": NAN}), "binding_strength"),
    ("global strength inf", lambda: module_strengths(["img_in"], SHAPE, global_strength=INF), "global_strength"),
    ("strength nan", lambda: _stack_with(NAN), "strength of LoRA 'x'"),
    ("strength 1e308", lambda: _stack_with(1e308), "strength of LoRA 'x'"),
    ("block strength inf", lambda: _stack_with(1.0, INF), "block strength"),
    (
        "cfg nan",
        lambda: sample(tiny_klein(SPEC), torch.zeros(1, 128, 2, 2), torch.zeros(3, 16), torch.ones(2), cfg=NAN),
        "cfg",
    ),
    ("scales overflow", lambda: parse_scales("0:1e308:1e-308", -1e309, 1e309), "larger step"),
    ("scales tiny step", lambda: parse_scales("0:4:1e-308"), "larger step"),
    ("scales nan", lambda: parse_scales("nan"), "not a finite number"),
    ("scales beyond range", lambda: parse_scales("0:1e308:1"), "outside"),
    ("settings lr nan", lambda: TrainSettings(learning_rate=NAN), "learning_rate"),
    ("settings alpha inf", lambda: TrainSettings(alpha=INF), "alpha"),
]


@pytest.mark.parametrize(("call", "words"), [r[1:] for r in BAD_NUMBERS], ids=[r[0] for r in BAD_NUMBERS])
def test_non_finite_and_absurd_numbers_are_refused_by_name(call, words: str) -> None:
    """NaN, Inf and 1e308 in block vectors, group and global strengths, LoRA strengths, cfg, scrub scales and ranges
    and training settings each raise a ValueError naming the value, never a bare OverflowError or a silent
    non-finite result."""
    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value), str(info.value)


def _lora(tmp: Path, name: str, rank: int = 2, alpha: float | None = None, scale: float = 0.01) -> Path:
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.full((rank, 128), scale),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.full((384, rank), scale),
    }
    if alpha is not None:
        tensors["diffusion_model.double_blocks.0.img_attn.qkv.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp / name))
    return tmp / name


BAD_LORAS = [
    ("rank 0", dict(rank=0), "rank 0"),
    ("alpha 1e30", dict(alpha=1e30), "would change the model's weights"),
    ("weights near 3e38", dict(scale=3e38), "would change the model's weights"),
]


@pytest.mark.parametrize(("kwargs", "words"), [r[1:] for r in BAD_LORAS], ids=[r[0] for r in BAD_LORAS])
def test_lora_files_with_rank_0_or_absurd_scale_are_refused_by_name(tmp_path: Path, kwargs, words: str) -> None:
    """A LoRA file of rank 0 (was a ZeroDivisionError) or whose alpha/weights change the base weights by more than
    1e3 (was a silent Inf/NaN output) is refused by both readers, naming the file."""
    path = _lora(tmp_path, "bad.safetensors", **kwargs)
    with pytest.raises(LoraFormatError) as info:
        read_lora_file(path, SHAPE)
    assert "bad.safetensors" in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=words):
        load_lora(path)


def test_an_ordinary_lora_is_still_read(tmp_path: Path) -> None:
    """The weight-change bound does not refuse a normal LoRA (alpha = rank, weights ~0.01)."""
    read = read_lora_file(_lora(tmp_path, "ok.safetensors", alpha=2.0), SHAPE)
    assert math.isfinite(read.weights["double_blocks.0.img_attn.qkv"].largest_change())


# ------------------------------------------------------------------------------------------------- writes


def test_a_full_disk_under_the_encode_cache_gives_the_disk_full_message(tmp_path, monkeypatch) -> None:
    """The encode cache writes through the pack's atomic writer: ENOSPC halfway through an entry raises
    DiskFullError naming the entry and the fix, and leaves neither the entry nor a temporary file."""
    real_fdopen = os.fdopen

    class _Full:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _Full(real_fdopen(*a, **k)))
    cache = LatentCache(tmp_path / "cache")
    with pytest.raises(DiskFullError, match=r"disk is full.*Fix: free disk space"):
        cache.put("cd" * 32, {"latent": torch.zeros(128, 2, 2)})
    monkeypatch.undo()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_previews_are_written_atomically(tmp_path: Path) -> None:
    """A preview whose encoder fails midway leaves the previous PNG whole (no 0-byte file, no temporary file)."""
    path = tmp_path / "step_000002_prompt0.png"
    atomic_write_with(path, lambda f: Image.new("RGB", (8, 8)).save(f, format="PNG"))
    before = path.read_bytes()

    def fails(f) -> None:
        f.write(b"\x89PNG")
        raise KeyboardInterrupt  # a kill in the middle of encoding

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(path, fails)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_error_values_are_cut_and_type_names_are_clean() -> None:
    """A 2 MB targets value comes back in a message of a few hundred characters (not the value twice), and the
    pack's error classes report a bare type name (ComfyUI shows module + qualname unless the module is builtins)."""
    with pytest.raises(SettingsError) as info:
        TrainSettings(targets="x" * 2_000_000)
    assert len(str(info.value)) < 1000 and "2000000 characters" in str(info.value)
    assert len(shown("y" * 10**6)) < 200
    from klein_lora_lab.trainer_core.album.dataset import DatasetError
    from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError as Lfe

    for cls in (DatasetError, UnsafePathError, SettingsError, Lfe, ScrubError, RunFolderError, DiskFullError):
        assert cls.__module__ == "builtins", cls


# ------------------------------------------------------------------------------------------------- resume

RUN = dict(rank=2, alpha=2, learning_rate=1e-3, steps=4, checkpoint_every=2, save_dtype="fp32", compile_blocks="off")


def _items() -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}") for i in range(2)
    ]


def _trained(tmp: Path) -> RunFolder:
    """A finished 4-step run with checkpoints at steps 2 and 4 (each with its state)."""
    settings = TrainSettings(**RUN)
    run = RunFolder.create(tmp / "run", settings, {})
    train(tiny_klein(SPEC), _items(), settings, run)
    return run


def _resume(path: Path, **changes):
    settings = TrainSettings(**{**RUN, "steps": 6, **changes})
    return train(tiny_klein(SPEC), _items(), settings, RunFolder.open(path), resume=True)


def _truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path: Path) -> None:
    """A truncated latest .state (was 'invalid header length', no file named, no fallback) or a truncated latest
    LoRA file: resume continues from the previous good checkpoint and its notes name the damaged file."""
    for damaged in ("state", "safetensors"):
        run = _trained(tmp_path / damaged)
        _truncate(run.checkpoints_dir / f"step_000004.{damaged}")
        result = _resume(run.path)
        assert result.steps_done == 6, result
        notes = " ".join(result.notes)
        assert "resumed from step 2" in notes and f"step_000004.{damaged}" in notes, notes
        assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_good_checkpoint_names_the_files_and_writes_nothing(tmp_path: Path) -> None:
    """Every state truncated: RunFolderError lists each damaged file; run.json and metrics are unchanged."""
    run = _trained(tmp_path)
    for step in (2, 4):
        _truncate(run.state_path(step))
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match=r"no checkpoint is whole.*step_000004\.state.*step_000002\.state"):
        _resume(run.path)
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before


def test_a_run_without_run_json_is_not_overwritten_by_new_settings(tmp_path: Path) -> None:
    """run.json deleted, then a run of another rank in the same folder: refused before anything is written (was: a
    new run.json, then a raw size-mismatch error, then neither rank resumed). Restoring run.json resumes."""
    run = _trained(tmp_path)
    saved = (run.path / "run.json").read_bytes()
    (run.path / "run.json").unlink()
    with pytest.raises(RunFolderError, match="checkpoints but no run.json.*restore run.json"):
        RunFolder.create(run.path, TrainSettings(**{**RUN, "rank": 4}), {})
    assert not (run.path / "run.json").exists()
    (run.path / "run.json").write_bytes(saved)
    assert _resume(run.path).steps_done == 6


DAMAGED_RUN_JSON = [
    ("not JSON", b'{"format": "klein_lab.run.v1", "settin', "not JSON"),
    ("no settings", b'{"format": "klein_lab.run.v1"}', "no 'settings'"),
    ("settings not an object", b'{"format": "klein_lab.run.v1", "settings": 3}', "no 'settings'"),
    ("a list", b"[1, 2]", "no 'settings'"),
    ("bad value", b'{"format": "klein_lab.run.v1", "settings": {"rank": "x"}, "meta": {}}', "rank"),
    ("unknown field", b'{"format": "klein_lab.run.v1", "settings": {"colour": 1}, "meta": {}}', "colour"),
    ("binary", b"\xff\xfe\x00garbage", "not JSON"),
]


@pytest.mark.parametrize(("data", "words"), [r[1:] for r in DAMAGED_RUN_JSON], ids=[r[0] for r in DAMAGED_RUN_JSON])
def test_a_damaged_run_json_is_named_with_the_fix(tmp_path: Path, data: bytes, words: str) -> None:
    """A hand-damaged run.json gives RunFolderError naming run.json and the fix (was JSONDecodeError/KeyError)."""
    RunFolder.create(tmp_path / "run", TrainSettings(), {})
    (tmp_path / "run" / "run.json").write_bytes(data)
    with pytest.raises(RunFolderError) as info:
        RunFolder.open(tmp_path / "run")
    assert "run.json" in str(info.value) and words in str(info.value) and "Fix:" in str(info.value), str(info.value)


def test_damaged_metrics_are_named_and_gaps_are_reported(tmp_path: Path) -> None:
    """A damaged metrics line in the middle stops resume with the line number and the fix; lines removed by hand
    resume with a note that the loss curve has a gap there."""
    run = _trained(tmp_path)
    lines = run.metrics_path.read_text().splitlines()
    run.metrics_path.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: line 2 is damaged.*delete that line"):
        _resume(run.path)
    run.metrics_path.write_text("\n".join([lines[0], *lines[3:]]) + "\n")  # steps 2 and 3 lost
    result = _resume(run.path)
    assert result.steps_done == 6 and any("no record of 2 step(s)" in n for n in result.notes), result.notes


def test_nothing_to_resume_is_said(tmp_path: Path) -> None:
    """resume on a run that has no checkpoint yet trains from step 0 and says so in its notes."""
    settings = TrainSettings(**{**RUN, "steps": 2, "checkpoint_every": 0})
    run = RunFolder.create(tmp_path / "run", settings, {})
    result = train(tiny_klein(SPEC), _items(), settings, run, resume=True)
    assert result.steps_done == 2 and any("nothing to resume" in n for n in result.notes), result.notes


def test_a_state_of_another_shape_is_not_loaded(tmp_path: Path) -> None:
    """run.json edited to another rank: the states do not match its LoRA, so resume refuses naming the files, and
    run.json is left as it was (no write before validation)."""
    run = _trained(tmp_path)
    data = json.loads((run.path / "run.json").read_text())
    data["settings"]["rank"] = 4
    data["settings"]["alpha"] = 4.0
    (run.path / "run.json").write_text(json.dumps(data))
    before = (run.path / "run.json").read_bytes()
    with pytest.raises(RunFolderError, match=r"step_000004\.state does not match run.json's LoRA \(rank 4"):
        _resume(run.path, rank=4, alpha=4)
    assert (run.path / "run.json").read_bytes() == before


def test_a_state_whose_description_does_not_load_falls_back(tmp_path: Path) -> None:
    """A latest state whose optimizer description was edited by hand (its param group lost 'params') is skipped
    like a truncated one: resume continues from step 2 and names the file."""
    from safetensors import safe_open
    from safetensors.torch import save

    run = _trained(tmp_path)
    path = run.state_path(4)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    info = json.loads(meta["klein_lab.state"])
    info["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in info["param_groups"]]
    path.write_bytes(save(tensors, metadata={"klein_lab.state": json.dumps(info)}))
    result = _resume(run.path)
    assert result.steps_done == 6 and "step_000004.state does not load" in " ".join(result.notes), result.notes


def test_diagnostics_linked_from_outside_are_refused(tmp_path: Path, linked) -> None:
    """A run's diagnostics.json that links outside the run is refused by name; a damaged one names the fix."""
    from klein_lora_lab.trainer_core.analysis.sweet_spot import DIAGNOSTICS_FILE, read_diagnostics

    run = tmp_path / "run"
    run.mkdir()
    (run / DIAGNOSTICS_FILE).symlink_to(linked["outside"] / "secret.txt")
    with pytest.raises(UnsafePathError, match="diagnostics of run run"):
        read_diagnostics(run)
    (run / DIAGNOSTICS_FILE).unlink()
    (run / DIAGNOSTICS_FILE).write_bytes(b"{broken")
    with pytest.raises(ValueError, match="is damaged.*run the diagnosis again"):
        read_diagnostics(run)
