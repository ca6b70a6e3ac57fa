#!/usr/bin/env bash
# Runs every test tier: unit always; comfy and browser when ComfyUI / Chromium are there (otherwise pytest
# prints one loud line per skipped tier saying how to enable it; with CI=true a tier that cannot run fails).
# Without arguments the tiers run one pytest each (unit, comfy, browser, gpu), each with a timing line, and
# the status is non-zero when any tier failed. Extra arguments make it one pytest run with them, e.g.
#   bash scripts/test.sh -m unit            only the unit tier
#   COMFYUI_PATH=~/ComfyUI bash scripts/test.sh tests/comfy
# KLEIN_TIMINGS=FILE appends one "part seconds" line per tier to FILE (.ci/run prints them as a summary).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
klein_setup_python
klein_setup_comfyui
klein_setup_browser

# One pytest run; exit 5 (no tests collected for this selection) is not a failure.
klein_pytest() {
  local status=0
  "$KLEIN_PY" -m pytest "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests for this selection (exit 5): not a failure."
    status=0
  fi
  return "$status"
}

if [ "$#" -gt 0 ]; then
  status=0
  klein_pytest "$@" || status=$?
  exit "$status"
fi

status=0
summary=()
for tier in unit comfy browser gpu; do
  echo "[test] === $tier tier (tests/$tier) ==="
  start=$SECONDS
  tier_status=0
  # --durations: the slowest tests of each tier are named in the log, so a slow CI run says where time went.
  klein_pytest "tests/$tier" --durations=10 || tier_status=$?
  took=$((SECONDS - start))
  word="passed"
  if [ "$tier_status" -ne 0 ]; then
    word="FAILED (pytest exit $tier_status)"
    [ "$status" -ne 0 ] || status=$tier_status
  fi
  line="$(printf '%-8s %4d s  %s' "$tier" "$took" "$word")"
  summary+=("$line")
  echo "[test] $line"
  if [ -n "${KLEIN_TIMINGS:-}" ]; then echo "tier:$tier $took $word" >>"$KLEIN_TIMINGS"; fi
done
echo "[test] tiers:"
printf '[test]   %s\n' "${summary[@]}"
exit "$status"
