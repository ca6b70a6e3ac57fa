"""The training panel's cost: s/step of the same run on a real ComfyUI server (tiny Klein, CPU) with nothing
connected, with a bare websocket listener, and with a headless page on the style workflow whose Train node's panel
follows the run; and the events the run sends per step (count and bytes, by type).

Every run is the Train node queued through /prompt with the same widgets, steps and seed (only the run name
differs); the prompt carries the listener's (or the page's) client id, as a prompt queued from that page would.
Modes alternate within each repeat, so drift of a shared machine hits all of them. Per run it prints:
  step_s        mean of metrics.jsonl's `seconds` (one optimizer step, forward to update) after the first step
  wall_s        the node's own rate ('N it/s' in its closing text: the whole run over its steps)
  server_cpu_s  CPU seconds the server process used during the run; page_cpu_s the same for the page (Chromium),
                and page_idle_cpu_per_s what the same page uses per second with nothing training (its baseline)
  events/bytes  websocket frames per step the client received, and their bytes, by event type
and the machine's load (`uptime`) before and after.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/panel_cost.py --steps 30 --repeats 2

The page needs Debian's Chromium and tests/browser/node_modules (playwright-core), as the browser tier does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.comfy_env import comfy_path  # noqa: E402
from harness.pack import register_pack  # noqa: E402
from harness.ws_events import EventListener  # noqa: E402

MODES = ("none", "socket", "page")
WORKFLOW = ROOT / "workflows" / "Klein 01 - Train a style LoRA.json"
PAGE_DRIVER = ROOT / "benchmarks" / "panel_page.mjs"
IDLE_S = 5.0


class Page:
    """The headless page of benchmarks/panel_page.mjs on the style workflow, following `run`."""

    def __init__(self, url: str, run: str) -> None:
        self.url, self.run = url, run
        self.profile = tempfile.TemporaryDirectory(prefix="klein-lab-bench-chromium-")
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Page:
        self.proc = subprocess.Popen(
            ["node", str(PAGE_DRIVER), self.url, self.profile.name, self.run, str(WORKFLOW)],
            cwd=ROOT / "tests" / "browser",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the page did not open: {self.proc.stderr.read()[-3000:]}")
        self.client_id = json.loads(line)["clientId"]
        before = self.cpu_seconds()
        time.sleep(IDLE_S)  # the page's baseline: open on the workflow, nothing training
        self.idle_cpu_per_s = (self.cpu_seconds() - before) / IDLE_S
        return self

    def cpu_seconds(self) -> float:
        """CPU time of the driver and every Chromium process under it so far."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None and exc[0] is None:
            self.proc.stdin.write("done\n")
            self.proc.stdin.flush()
            out = self.proc.stdout.readline()
            self.result = json.loads(out) if out else {}
        self.proc.stdin.close()
        self.proc.wait(60)
        self.profile.cleanup()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_run(server, base: dict[str, Any], run: str, mode: str, steps: int) -> dict[str, Any]:
    """Queue the Train node as `run` with a client of `mode` connected; the figures of that run."""
    from harness.prompts import train_prompt

    prompt = train_prompt(
        base["album"],
        base["cond_file"],
        run,
        steps,
        checkpoint_every=base["checkpoint_every"],
        sample_every=base["sample_every"],
    )
    server_proc = psutil.Process(server.process.pid)
    client: EventListener | Page | None = None
    if mode == "socket":
        client = EventListener(server.url)
    elif mode == "page":
        client = Page(server.url, run)
    with client if client is not None else _nothing():
        client_id = client.client_id if client is not None else server.client_id
        page_cpu0 = client.cpu_seconds() if isinstance(client, Page) else 0.0
        cpu0 = sum(server_proc.cpu_times()[:2])
        start = time.perf_counter()
        reply = server.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        entry = server.wait_history(reply["prompt_id"], timeout_s=3600)
        run_s = time.perf_counter() - start
        server_cpu = sum(server_proc.cpu_times()[:2]) - cpu0
        page_cpu = client.cpu_seconds() - page_cpu0 if isinstance(client, Page) else None
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{run} failed: {entry['status']}\n{server.log_tail()}")
    records = [json.loads(line) for line in (server.runs / run / "metrics.jsonl").read_text().splitlines()]
    text = entry["outputs"]["6"]["text"][0]
    rate = float(text.split("(", 1)[1].split(" it/s", 1)[0])
    frames = {}
    if isinstance(client, EventListener):
        frames = dict(client.frames)
    elif isinstance(client, Page):
        frames = client.result.get("frames", {})
    return {
        "mode": mode,
        "run": run,
        "steps": len(records),
        "step_s": round(statistics.fmean(r["seconds"] for r in records[1:]), 4),
        "wall_s": round(1 / rate, 4) if rate > 0 else None,
        "server_cpu_s": round(server_cpu, 2),
        "run_s": round(run_s, 2),
        "page_cpu_s": None if page_cpu is None else round(page_cpu, 2),
        "page_idle_cpu_per_s": round(client.idle_cpu_per_s, 3) if isinstance(client, Page) else None,
        "events_per_step": round(sum(c for c, _ in frames.values()) / steps, 2) if frames else None,
        "bytes_per_step": round(sum(b for _, b in frames.values()) / steps) if frames else None,
        "by_type": {k: {"per_step": round(c / steps, 2), "bytes": b} for k, (c, b) in sorted(frames.items())},
        "panel": client.result.get("panel") if isinstance(client, Page) else None,
    }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--sample-every", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,socket,page")
    args = parser.parse_args()
    root = comfy_path()
    if root is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    register_pack()
    from harness.fixtures import tiny_conditioning_path, tiny_klein_path
    from harness.server import ComfyServer, prepare_base_dir
    from harness.vae import flux2_vae_path
    from harness.workflow_prompt import make_album

    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="klein-lab-panel-bench-") as tmp:
        base_dir = prepare_base_dir(Path(tmp), tiny_klein_path(seed=0), flux2_vae_path(seed=0))
        server = ComfyServer.start(root, base_dir)
        server.runs = base_dir / "output" / "klein_lora_lab" / "runs"
        try:
            album = make_album(base_dir / "input" / "bench_album", label="bench", tint=7)
            base = {
                "album": album,
                "cond_file": tiny_conditioning_path(tokens=8),
                "checkpoint_every": args.checkpoint_every,
                "sample_every": args.sample_every,
            }
            header = {
                "steps": args.steps,
                "checkpoint_every": args.checkpoint_every,
                "sample_every": args.sample_every,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "cpus": os.cpu_count(),
            }
            print(json.dumps(header), flush=True)
            one_run(server, base, "warmup", "none", 3)  # loads the model and the album once, outside the figures
            results = []
            for repeat in range(args.repeats):
                print(f"# repeat {repeat + 1}: {uptime()}", flush=True)
                for mode in modes:
                    result = one_run(server, base, f"bench_{mode}_{repeat}", mode, args.steps)
                    results.append(result)
                    print(json.dumps(result), flush=True)
                print(f"# after repeat {repeat + 1}: {uptime()}", flush=True)
            for mode in modes:
                ours = [r for r in results if r["mode"] == mode]
                summary = {
                    "mode": mode,
                    "median_step_s": statistics.median(r["step_s"] for r in ours),
                    "median_wall_s": statistics.median(r["wall_s"] for r in ours),
                    "median_server_cpu_s": statistics.median(r["server_cpu_s"] for r in ours),
                }
                print(json.dumps(summary), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
