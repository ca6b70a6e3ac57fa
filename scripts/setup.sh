# Shared install logic for .ci/run, scripts/test.sh and scripts/demo.sh. Source it, then call the steps:
#
#   source scripts/setup.sh
#   klein_setup_python     # .venv with pinned torch/torchvision/torchaudio, the pack's requirements, ruff, pytest
#   klein_setup_comfyui    # finds a ComfyUI (order below) and installs its requirements
#   klein_setup_browser    # Debian chromium + fonts (+ Node.js), playwright-core in tests/browser (browser tier)
#
# Afterwards $KLEIN_PY is the Python to use and COMFYUI_PATH is exported when a ComfyUI was found. ComfyUI is
# looked for in this order:
#   1. COMFYUI_PATH when set;
#   2. the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>);
#   3. the vendored ComfyUI 0.29.0 beside this repository (../shared/vendor/ComfyUI-0.29.0), used through a copy
#      in .cache/ComfyUI-0.29.0 (refreshed when the source changes) so nothing is ever written into it;
#   4. a pinned shallow clone in .cache/ComfyUI (20 s limit).
# A step that cannot complete (offline, no root) says so loudly and lets the caller go on: the tiers that need
# the missing piece are then skipped by pytest with one line each. With CI=true the same step fails instead
# (non-zero status and the reason), so CI never passes with a tier left out.
#
# Settings (environment):
#   KLEIN_LAB_PYTHON   use this interpreter as is (no venv, no installs), e.g. the Python of your ComfyUI
#   PYTHON             interpreter that creates .venv (default: python3)
#   COMFYUI_PATH       a ComfyUI checkout to test against (skips the search and the clone)
#   KLEIN_LAB_NO_CLONE=1   never try to clone ComfyUI
#   CI=true            a setup step that cannot complete fails the caller

KLEIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KLEIN_CACHE="$KLEIN_ROOT/.cache"
KLEIN_CONSTRAINTS="$KLEIN_CACHE/constraints.txt"
# torch belongs to ComfyUI; these three are installed together (matching builds) and never upgraded.
KLEIN_TORCH_PINS="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
KLEIN_RUFF="ruff==0.17.5"
KLEIN_PYTEST="pytest==9.2.0"
KLEIN_COMFYUI_REPO="https://github.com/comfyanonymous/ComfyUI.git"
KLEIN_COMFYUI_REF="v0.29.0"
# The vendored ComfyUI of the shared folder beside this repository (relative: never a path of one machine).
KLEIN_VENDOR_COMFYUI="$KLEIN_ROOT/../shared/vendor/ComfyUI-0.29.0"
KLEIN_VENDOR_COPY="$KLEIN_CACHE/ComfyUI-0.29.0"

klein_say() { printf '[setup] %s\n' "$*"; }
klein_warn() { printf '\n!!! [setup] %s\n\n' "$*" >&2; }

klein_is_ci() { case "${CI:-}" in true | TRUE | True | 1 | yes) return 0 ;; *) return 1 ;; esac; }

# A piece a test tier needs is missing: a loud line and go on, or (CI=true) a failure with the reason.
# Callers: `klein_missing "why"; return` so that the status is the function's own.
klein_missing() {
  if klein_is_ci; then
    printf '\n!!! [setup] CI=true and a test tier cannot run: %s\n\n' "$*" >&2
    return 1
  fi
  klein_warn "$*"
}

klein_pip() { "$KLEIN_PY" -m pip install --progress-bar off -q -c "$KLEIN_CONSTRAINTS" "$@"; }

# A stamp of everything that decides the installed set, so a second run skips pip entirely.
klein_stamp() {
  cat "$KLEIN_ROOT/requirements.txt" "$KLEIN_CONSTRAINTS"
  echo "comfyui-requirements:"
  if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then cat "$COMFYUI_PATH/requirements.txt"; fi
}

klein_setup_python() {
  mkdir -p "$KLEIN_CACHE" || return
  tr ' ' '\n' <<<"$KLEIN_TORCH_PINS" >"$KLEIN_CONSTRAINTS" || return
  if [ -n "${KLEIN_LAB_PYTHON:-}" ]; then
    KLEIN_PY="$KLEIN_LAB_PYTHON"
    klein_say "using $KLEIN_PY as is (KLEIN_LAB_PYTHON set; nothing installed)"
    return 0
  fi
  local venv="$KLEIN_ROOT/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    klein_say "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv" || return
  fi
  KLEIN_PY="$venv/bin/python"
  local wanted
  wanted="$(cat "$KLEIN_CONSTRAINTS" "$KLEIN_ROOT/requirements.txt" "$KLEIN_ROOT/tests/requirements.txt"; echo "$KLEIN_RUFF $KLEIN_PYTEST")"
  if [ -f "$venv/.klein-lab-python" ] && [ "$(cat "$venv/.klein-lab-python")" = "$wanted" ]; then
    klein_say "python packages up to date in $venv"
    return 0
  fi
  klein_say "installing $KLEIN_TORCH_PINS (first run downloads a few GB)"
  # shellcheck disable=SC2086  # the pins are separate words on purpose
  klein_pip $KLEIN_TORCH_PINS || return
  klein_say "installing the pack's requirements, the tests' (diffusers, LyCORIS), ruff, pytest"
  # Pinned tools: another ruff release may format differently and fail `ruff format --check`.
  klein_pip -r "$KLEIN_ROOT/requirements.txt" -r "$KLEIN_ROOT/tests/requirements.txt" "$KLEIN_RUFF" "$KLEIN_PYTEST" || return
  echo "$wanted" >"$venv/.klein-lab-python"
}

# A stamp of a ComfyUI tree's files (names and contents), to tell when the vendored source changed.
klein_tree_stamp() {
  (cd "$1" && find . -type f -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) |
    sha256sum | cut -d' ' -f1
}

# Copies the vendored ComfyUI into .cache once, and again when its source differs from what was copied. The
# copy is what runs: Python drops __pycache__ next to the modules it imports, and the vendored tree stays as is.
klein_vendor_copy() {
  local stamp_file="$KLEIN_VENDOR_COPY/.klein-lab-source-stamp" stamp
  stamp="$(klein_tree_stamp "$KLEIN_VENDOR_COMFYUI")" || return
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    return 0
  fi
  klein_say "copying the vendored ComfyUI into ${KLEIN_VENDOR_COPY#"$KLEIN_ROOT"/}"
  mkdir -p "$KLEIN_CACHE" || return
  rm -rf "$KLEIN_VENDOR_COPY" "$KLEIN_VENDOR_COPY.partial" || return
  cp -R "$KLEIN_VENDOR_COMFYUI" "$KLEIN_VENDOR_COPY.partial" || return
  chmod -R u+w "$KLEIN_VENDOR_COPY.partial" || return # the source is read-only; the copy must take __pycache__
  echo "$stamp" >"$KLEIN_VENDOR_COPY.partial/.klein-lab-source-stamp" || return
  mv "$KLEIN_VENDOR_COPY.partial" "$KLEIN_VENDOR_COPY"
}

klein_is_comfyui() { [ -f "$1/main.py" ] && [ -d "$1/comfy" ]; }

# Finds (or copies, or clones) a ComfyUI in the order given at the top and installs its requirements into
# $KLEIN_PY's environment.
klein_setup_comfyui() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    if ! klein_is_comfyui "$COMFYUI_PATH"; then
      klein_missing "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / comfy/); the comfy and browser tiers will be skipped."
      return
    fi
  elif [ "$(basename "$(dirname "$KLEIN_ROOT")")" = "custom_nodes" ] && klein_is_comfyui "$KLEIN_ROOT/../.."; then
    COMFYUI_PATH="$(cd "$KLEIN_ROOT/../.." && pwd)"
  elif klein_is_comfyui "$KLEIN_VENDOR_COMFYUI"; then
    klein_vendor_copy || return
    COMFYUI_PATH="$KLEIN_VENDOR_COPY"
  elif klein_is_comfyui "$KLEIN_CACHE/ComfyUI"; then
    COMFYUI_PATH="$KLEIN_CACHE/ComfyUI"
  elif [ "${KLEIN_LAB_NO_CLONE:-0}" = "1" ]; then
    klein_missing "no ComfyUI (no COMFYUI_PATH, no ../shared/vendor/ComfyUI-0.29.0, no clone): set COMFYUI_PATH=/path/to/ComfyUI to run the comfy and browser tiers."
    return
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
      klein_missing "could not clone ComfyUI (offline?): the comfy and browser tiers will be skipped. Set COMFYUI_PATH=/path/to/ComfyUI to run them."
      return
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
  klein_pip -r "$COMFYUI_PATH/requirements.txt" || return
  klein_stamp >"$stamp"
}

# Chromium from Debian and playwright-core from npm; never a browser download of a test tool's own.
klein_setup_browser() {
  local debs=()
  [ -x /usr/bin/chromium ] || debs+=(chromium fonts-liberation)
  command -v npm >/dev/null || debs+=(nodejs npm)
  if [ "${#debs[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      klein_say "installing Debian ${debs[*]}"
      if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq "${debs[@]}" >/dev/null; }; then
        klein_missing "apt-get install ${debs[*]} failed: the browser tier will be skipped."
        return
      fi
    else
      klein_missing "no root to install ${debs[*]}: the browser tier will be skipped (apt-get install -y ${debs[*]})."
      return
    fi
  fi
  if [ -d "$KLEIN_ROOT/tests/browser/node_modules/playwright-core" ]; then
    return 0
  fi
  klein_say "installing playwright-core (tests/browser)"
  if ! (cd "$KLEIN_ROOT/tests/browser" && timeout 300 npm ci --no-audit --no-fund --loglevel=error); then
    klein_missing "npm ci in tests/browser failed: the browser tier will be skipped."
    return
  fi
}
