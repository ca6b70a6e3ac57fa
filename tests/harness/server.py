"""A real ComfyUI server for the comfy and browser tiers: headless, CPU, loopback, pack linked into custom_nodes.

`ComfyServer.start(comfy_root, base_dir)` runs
`python main.py --cpu --listen 127.0.0.1 --port P --base-directory DIR --database-url sqlite:///:memory:
--disable-api-nodes` with cwd = the ComfyUI checkout, captures its log to `DIR/server.log`, waits for
`/object_info` and fails with the log's tail when the server dies or does not answer in time.
`prepare_base_dir` lays out DIR: the tiny Klein model, the random Flux2 VAE, the pack symlinked as
`custom_nodes/klein_lora_lab`, the test-only conditioning loader node, and frontend settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy_env import PACK_ROOT

PACK_DIR_NAME = "klein_lora_lab"
TINY_MODEL_NAME = "tiny_klein.safetensors"
VAE_NAME = "flux2_vae_random.safetensors"
STARTUP_TIMEOUT_S = float(os.environ.get("KLEIN_LAB_SERVER_TIMEOUT", "180"))
TEST_NODES_SOURCE = Path(__file__).with_name("comfy_test_nodes.py")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ServerError(RuntimeError):
    """The server failed to start, died, or a prompt failed; the message carries the log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


def prepare_base_dir(
    base: Path, model_file: Path, vae_file: Path | None, settings: dict[str, Any] | None = None
) -> Path:
    """Lay out a ComfyUI base directory for tests and return it."""
    _link(model_file, base / "models" / "diffusion_models" / TINY_MODEL_NAME)
    if vae_file is not None:
        _link(vae_file, base / "models" / "vae" / VAE_NAME)
    _link(PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    # Test-only nodes live in the temp custom_nodes, never in the pack.
    shutil.copyfile(TEST_NODES_SOURCE, base / "custom_nodes" / "klein_lab_test_nodes.py")
    for sub in ("input", "output", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    # Without TutorialCompleted the frontend opens a template dialog that swallows clicks.
    all_settings = {"Comfy.TutorialCompleted": True, **(settings or {})}
    (user / "comfy.settings.json").write_text(json.dumps(all_settings, indent=2))
    return base


@dataclass
class ComfyServer:
    comfy_root: Path
    base_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    startup_s: float = 0.0
    startup_log: str = ""  # the log up to the moment the server answered: import errors show up here
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls, comfy_root: Path, base_dir: Path, timeout_s: float = STARTUP_TIMEOUT_S, python: str = sys.executable
    ) -> ComfyServer:
        port = free_port()
        log_path = base_dir / "server.log"
        cmd = [
            python,  # another interpreter: e.g. the environment a Manager-style install test made
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
        ]
        # One intra-op thread unless the caller chose: CPU float sums are reproducible between the server and the
        # training processes it spawns (the device tests compare them bit for bit) only at one fixed split, and
        # a 2-core CI machine runs the test process and the server side by side.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        server = cls(comfy_root, base_dir, port, process, log_path)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        server.startup_s = time.perf_counter() - start
        server.startup_log = server.log_text()
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"ComfyUI exited with code {self.process.returncode} during startup.\n{self.log_tail()}"
                )
            try:
                self.get_json("/object_info", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout_s:.0f} s.\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    # --- HTTP ------------------------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise ServerError(f"POST {path} -> HTTP {err.code}: {err.read().decode(errors='replace')}") from err
        return json.loads(raw) if raw else None

    def object_info(self) -> dict[str, Any]:
        return self.get_json("/object_info")

    def queue_prompt(self, prompt: dict[str, Any]) -> str:
        """POST an API-format prompt; return its prompt_id (ServerError names the failing nodes)."""
        reply = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if reply.get("node_errors"):
            raise ServerError(f"prompt rejected: {json.dumps(reply['node_errors'], indent=2)}")
        return reply["prompt_id"]

    def wait_history(self, prompt_id: str, timeout_s: float = 120) -> dict[str, Any]:
        """Poll /history/<id> until the prompt finished (success or error); return its history entry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}.\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s.\n{self.log_tail()}")

    def wait_running(self, prompt_id: str, timeout_s: float = 60) -> None:
        """Wait until /queue shows the prompt as running (e.g. before sending /interrupt)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = self.get_json("/queue").get("queue_running", [])
            if any(item[1] == prompt_id for item in running):
                return
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} was not running within {timeout_s:.0f} s.\n{self.log_tail()}")

    def run_prompt(self, prompt: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """Queue a prompt, wait for it, and return its outputs ({node_id: ui dict}); raise if it failed."""
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait_history(prompt_id, timeout_s)
        if entry["status"]["status_str"] != "success":
            messages = json.dumps(entry["status"].get("messages", []), indent=2)[-4000:]
            raise ServerError(f"prompt {prompt_id} failed: {messages}\n{self.log_tail()}")
        return entry["outputs"]

    def interrupt(self) -> None:
        self.post_json("/interrupt")

    def view_file(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        """Bytes of an output file as the frontend fetches it (/view)."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as resp:
            return resp.read()


def pack_import_errors(log: str, pack_name: str = PACK_DIR_NAME) -> list[str]:
    """Log lines that report an import failure or traceback mentioning the pack (empty when it loaded).

    ComfyUI prefixes its log lines with a coloured level ("\\x1b[33m[WARNING]\\x1b[0m Traceback ..."), so the
    markers are searched anywhere in a line after the colour codes are removed.
    """
    lines = [ANSI.sub("", line) for line in log.splitlines()]
    bad = []
    for i, line in enumerate(lines):
        if pack_name in line and ("IMPORT FAILED" in line or "Cannot import" in line):
            bad.append(line)
        if "Traceback (most recent call last)" in line:
            block = "\n".join(lines[i : i + 40])
            if pack_name in block:
                bad.append(block)
    return bad
