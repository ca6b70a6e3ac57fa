#!/usr/bin/env bash
# Runs every test tier: unit always; comfy and browser when ComfyUI / Chromium are there (otherwise pytest
# prints one loud line per skipped tier saying how to enable it). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m unit            only the unit tier
#   COMFYUI_PATH=~/ComfyUI bash scripts/test.sh tests/comfy
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
klein_setup_python
klein_setup_comfyui
klein_setup_browser

status=0
"$KLEIN_PY" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests for this selection (exit 5): not a failure."
  status=0
fi
exit "$status"
