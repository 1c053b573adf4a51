#!/usr/bin/env bash
# 8-bead PIMD of 27 periodic waters: i-PI integrates, one `aniserve drive` process computes
# all 8 beads in one batched pass (i-PI's <batch_size>8</batch_size>).
#
# Usage: examples/ipi-pimd-water/run.sh [MODEL]
#   MODEL: a name (aniserve models) or a path, absolute or relative to where you are;
#   default the embedded model, which needs no download.
# Everything is written into a fresh scratch folder (printed at the end), never into the
# source tree; i-PI is stopped and its socket removed on any exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-${MODEL:-aniserve-1x-ccsdt}}"
if [ -e "$model" ]; then model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"; fi
# Relative folders mean relative to where you ran this, not to the scratch folder.
if [ -d "${ANISERVE_MODEL_DIR:-}" ]; then ANISERVE_MODEL_DIR="$(cd "$ANISERVE_MODEL_DIR" && pwd)"; export ANISERVE_MODEL_DIR; fi

work="$(mktemp -d "${TMPDIR:-/tmp}/aniserve-ipi-XXXXXX")"
socket="aniserve-water-$$"
cp "$here/water27.xyz" "$work/"
sed "s|<address>aniserve-water</address>|<address>$socket</address>|" "$here/input.xml" > "$work/input.xml"
cd "$work"

ipi_pid=""
cleanup() {
    if [ -n "$ipi_pid" ]; then
        # i-PI's SIGTERM exit waits for a step that will never come without a driver:
        # give it a few seconds, then stop it for good.
        kill "$ipi_pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$ipi_pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$ipi_pid" 2>/dev/null || true
    fi
    rm -f "/tmp/ipi_$socket"
}
trap cleanup EXIT

i-pi input.xml > ipi.log 2>&1 &
ipi_pid=$!
aniserve drive --model "$model" --structure water27.xyz --unix "$socket" --pbc yes --connect-timeout 60
wait "$ipi_pid"
ipi_pid=""

echo "last steps of water.out (i-PI's units: energies in Hartree):"
printf '%6s %12s %16s %12s %16s\n' step "time/ps" "conserved/Ha" "T/K" "potential/Ha"
grep -v '^#' water.out | tail -n 3 | awk '{printf "%6d %12.5f %16.8f %12.2f %16.8f\n", $1, $2, $3, $4, $5}'
echo "output in $work"
