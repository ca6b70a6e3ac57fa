#!/usr/bin/env bash
# The main job, end to end on this machine: installs what is needed (.venv, ComfyUI when it can be had) and runs
# scripts/demo.py, which writes ./demo-output/ and prints what it did. Extra arguments go to demo.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
klein_setup_python
klein_setup_comfyui
exec "$KLEIN_PY" scripts/demo.py "$@"
