# Shared install logic for .ci/run, scripts/test.sh and scripts/demo.sh. Source it, then call the steps:
#
#   source scripts/setup.sh
#   klein_setup_python     # .venv with pinned torch/torchvision/torchaudio, the pack's requirements, ruff, pytest
#   klein_setup_comfyui    # COMFYUI_PATH, or the ComfyUI this pack sits in, or a pinned clone in .cache/ComfyUI
#   klein_setup_browser    # Debian chromium + fonts, playwright-core in tests/browser (browser test tier)
#
# Afterwards $KLEIN_PY is the Python to use and COMFYUI_PATH is exported when a ComfyUI was found.
# Every step that cannot complete (offline, no root) says so loudly and lets the caller go on: the tiers that
# need the missing piece are then skipped by pytest with one line each.
#
# Settings (environment):
#   KLEIN_LAB_PYTHON   use this interpreter as is (no venv, no installs), e.g. the Python of your ComfyUI
#   PYTHON             interpreter that creates .venv (default: python3)
#   COMFYUI_PATH       a ComfyUI checkout to test against (skips the clone)
#   KLEIN_LAB_NO_CLONE=1   never try to clone ComfyUI

KLEIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KLEIN_CACHE="$KLEIN_ROOT/.cache"
KLEIN_CONSTRAINTS="$KLEIN_CACHE/constraints.txt"
# torch belongs to ComfyUI; these three are installed together (matching builds) and never upgraded.
KLEIN_TORCH_PINS="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
KLEIN_RUFF="ruff==0.17.5"
KLEIN_PYTEST="pytest==9.2.0"
KLEIN_COMFYUI_REPO="https://github.com/comfyanonymous/ComfyUI.git"
KLEIN_COMFYUI_REF="v0.29.0"

klein_say() { printf '[setup] %s\n' "$*"; }
klein_warn() { printf '\n!!! [setup] %s\n\n' "$*" >&2; }

klein_pip() { "$KLEIN_PY" -m pip install --progress-bar off -q -c "$KLEIN_CONSTRAINTS" "$@"; }

# A stamp of everything that decides the installed set, so a second run skips pip entirely.
klein_stamp() {
  cat "$KLEIN_ROOT/requirements.txt" "$KLEIN_CONSTRAINTS"
  echo "comfyui-requirements:"
  if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then cat "$COMFYUI_PATH/requirements.txt"; fi
}

klein_setup_python() {
  mkdir -p "$KLEIN_CACHE"
  tr ' ' '\n' <<<"$KLEIN_TORCH_PINS" >"$KLEIN_CONSTRAINTS"
  if [ -n "${KLEIN_LAB_PYTHON:-}" ]; then
    KLEIN_PY="$KLEIN_LAB_PYTHON"
    klein_say "using $KLEIN_PY as is (KLEIN_LAB_PYTHON set; nothing installed)"
    return 0
  fi
  local venv="$KLEIN_ROOT/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    klein_say "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  KLEIN_PY="$venv/bin/python"
  local wanted
  wanted="$(cat "$KLEIN_CONSTRAINTS" "$KLEIN_ROOT/requirements.txt"; echo "$KLEIN_RUFF $KLEIN_PYTEST")"
  if [ -f "$venv/.klein-lab-python" ] && [ "$(cat "$venv/.klein-lab-python")" = "$wanted" ]; then
    klein_say "python packages up to date in $venv"
    return 0
  fi
  klein_say "installing $KLEIN_TORCH_PINS (first run downloads a few GB)"
  # shellcheck disable=SC2086  # the pins are separate words on purpose
  klein_pip $KLEIN_TORCH_PINS
  klein_say "installing the pack's requirements, ruff, pytest"
  # Pinned tools: another ruff release may format differently and fail `ruff format --check`.
  klein_pip -r "$KLEIN_ROOT/requirements.txt" "$KLEIN_RUFF" "$KLEIN_PYTEST"
  echo "$wanted" >"$venv/.klein-lab-python"
}

# Finds (or clones) a ComfyUI and installs its requirements into $KLEIN_PY's environment.
klein_setup_comfyui() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -d "$COMFYUI_PATH/comfy" ]; then
      klein_warn "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / comfy/); the comfy and browser tiers will be skipped."
      return 0
    fi
  elif [ "$(basename "$(dirname "$KLEIN_ROOT")")" = "custom_nodes" ] && [ -f "$KLEIN_ROOT/../../main.py" ]; then
    COMFYUI_PATH="$(cd "$KLEIN_ROOT/../.." && pwd)"
  elif [ -f "$KLEIN_CACHE/ComfyUI/main.py" ]; then
    COMFYUI_PATH="$KLEIN_CACHE/ComfyUI"
  elif [ "${KLEIN_LAB_NO_CLONE:-0}" = "1" ]; then
    klein_warn "no ComfyUI (no COMFYUI_PATH, no clone): set COMFYUI_PATH=/path/to/ComfyUI to run the comfy and browser tiers."
    return 0
  else
    klein_say "no COMFYUI_PATH: trying a shallow clone of ComfyUI $KLEIN_COMFYUI_REF (20 s limit)"
    rm -rf "$KLEIN_CACHE/ComfyUI.partial"
    if GIT_TERMINAL_PROMPT=0 timeout 20 git clone -q --depth 1 --branch "$KLEIN_COMFYUI_REF" \
      "$KLEIN_COMFYUI_REPO" "$KLEIN_CACHE/ComfyUI.partial" </dev/null; then
      mv "$KLEIN_CACHE/ComfyUI.partial" "$KLEIN_CACHE/ComfyUI"
      COMFYUI_PATH="$KLEIN_CACHE/ComfyUI"
    else
      rm -rf "$KLEIN_CACHE/ComfyUI.partial"
      export KLEIN_LAB_NO_CLONE=1 # one attempt per run: scripts started from here do not retry
      klein_warn "could not clone ComfyUI (offline?): the comfy and browser tiers will be skipped. Set COMFYUI_PATH=/path/to/ComfyUI to run them."
      return 0
    fi
  fi
  export COMFYUI_PATH
  klein_say "ComfyUI: $COMFYUI_PATH"
  if [ -n "${KLEIN_LAB_PYTHON:-}" ]; then return 0; fi
  local stamp="$KLEIN_ROOT/.venv/.klein-lab-comfyui"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(klein_stamp)" ]; then
    klein_say "ComfyUI requirements up to date"
    return 0
  fi
  klein_say "installing ComfyUI's requirements (torch stays pinned)"
  klein_pip -r "$COMFYUI_PATH/requirements.txt"
  klein_stamp >"$stamp"
}

# Chromium from Debian and playwright-core from npm; never a browser download of a test tool's own.
klein_setup_browser() {
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      klein_say "installing Debian chromium + fonts-liberation"
      if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq chromium fonts-liberation >/dev/null; }; then
        klein_warn "apt-get install chromium failed: the browser tier will be skipped."
      fi
    else
      klein_warn "no /usr/bin/chromium and no root to install it: the browser tier will be skipped (apt-get install -y chromium fonts-liberation)."
    fi
  fi
  if [ -d "$KLEIN_ROOT/tests/browser/node_modules/playwright-core" ]; then
    return 0
  fi
  if command -v npm >/dev/null; then
    klein_say "installing playwright-core (tests/browser)"
    if ! (cd "$KLEIN_ROOT/tests/browser" && timeout 300 npm ci --no-audit --no-fund --loglevel=error); then
      klein_warn "npm ci in tests/browser failed: the browser tier will be skipped."
    fi
  else
    klein_warn "no npm: the browser tier will be skipped (apt-get install -y nodejs npm)."
  fi
}
