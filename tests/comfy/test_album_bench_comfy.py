"""The large-album benchmark's smoke run: its main on the tiny Klein (CPU) through the folder, encode and
Train-node paths, with figures that agree with what is on disk."""

from __future__ import annotations

import json

from harness.benchmarks import load_benchmark


def test_album_bench_main_tiny_records_agree(comfy_root, tmp_path, capsys):
    """8 images in 2 aspect buckets, 2 steps of batch 4: the encode record counts every image once, its buckets
    sum to the album, its cache bytes are the cache files' sizes on disk, the warm pass encodes nothing; the train
    record trained 2 steps on the album; both lines go to --jsonl; ComfyUI's folders are left as they were."""
    import folder_paths

    bench = load_benchmark("album_bench")
    output_before = folder_paths.get_output_directory()
    jsonl = tmp_path / "album.jsonl"
    work = tmp_path / "work"
    args = ["--images", "8", "--steps", "2", "--aspects", "1:1,3:2", "--workdir", str(work), "--jsonl", str(jsonl)]
    encode, train = bench.main(args)

    assert encode["phase"] == "encode" and encode["images"] == 8
    assert encode["bucket_count"] == len(encode["buckets"]) == 2
    assert sum(encode["buckets"].values()) == 8
    cache = work / "output" / "klein_lora_lab" / "cache"
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert encode["cache_files"] == len(files) == encode["entries_encoded"]
    assert encode["cache_bytes"] == sum(p.stat().st_size for p in files)
    assert encode["latent_entries"] == 8 and encode["latent_bytes"] + encode["text_bytes"] == encode["cache_bytes"]
    # captions with and without the trigger, the 3 default validation prompts and the empty prompt
    assert encode["text_entries"] == encode["texts_encoded"] == 8 + 8 + 3 + 1
    assert encode["warm_entries_encoded"] == 0 and encode["warm_entries_cached"] == encode["entries_encoded"]
    assert encode["album_bytes"] == sum(p.stat().st_size for p in (work / "input" / "album").glob("*.jpg"))

    assert train["phase"] == "train" and train["steps"] == 2 and train["batch"] == 4
    assert train["trained_items"] + train["held_out"] == 8
    assert train["s_per_step"] > 0 and train["images_per_s"] > 0 and train["images_per_s_overall"] > 0
    assert train["peak_gib"] is None and train["compile"] == "auto"
    assert 1 <= train["shapes_seen"] <= 2 and train["status"] == "finished"

    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == [encode, train]
    assert "| train batch 4, compile auto |" in capsys.readouterr().out
    assert folder_paths.get_output_directory() == output_before
