#!/usr/bin/env bash
# 8-bead PIMD of a periodic water box: i-PI integrates, one aniserve process computes
# all 8 beads in one batched pass (i-PI's <batch_size>8</batch_size>).
# Needs the official weights: ANISERVE_MODEL_DIR=/path/to/ani-model-zoo (or the cache).
set -euo pipefail
cd "$(dirname "$0")"
rm -f /tmp/ipi_aniserve-water water.*
i-pi input.xml > ipi.log 2>&1 &
aniserve drive --model "${MODEL:-ani-1x}" --structure water27.xyz --unix aniserve-water --pbc yes
wait
tail -n 3 water.out
