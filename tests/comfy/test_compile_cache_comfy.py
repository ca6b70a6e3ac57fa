"""The compile cache while training: inductor's cache folder is the pack's folder in ComfyUI's user directory
(kept across restarts), a folder the user chose is kept, and the variable is restored afterwards."""

from __future__ import annotations

import os


def test_inductor_cache_is_the_packs_user_folder_during_training(comfy_root, monkeypatch, tmp_path):
    """Unset or torch's default: the pack's folder (created) for the duration, then as before; a folder of the
    user's own stays; nothing changes when nothing compiles."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.compile_cache import ENV, _torch_default, pack_compile_cache

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path / "user"))
    pack = tmp_path / "user" / "klein_lora_lab" / "compile-cache"
    monkeypatch.delenv(ENV, raising=False)
    with pack_compile_cache() as folder:
        assert folder == str(pack) and os.environ[ENV] == str(pack) and pack.is_dir()
    assert ENV not in os.environ
    monkeypatch.setenv(ENV, _torch_default())
    with pack_compile_cache() as folder:
        assert os.environ[ENV] == str(pack)
    assert os.environ[ENV] == _torch_default()
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    with pack_compile_cache() as folder:
        assert folder == os.environ[ENV] == str(tmp_path / "mine")
    monkeypatch.delenv(ENV)
    with pack_compile_cache(enabled=False) as folder:
        assert folder is None and ENV not in os.environ
