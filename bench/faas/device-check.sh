#!/usr/bin/env bash
# The FaaS evaluation on a GPU node (the paper's own setting), sized for one device call of
# under 10 minutes: builds the small zoo (23 models, 4.4 GiB; about 1-2 min with 16 cores), then
# bench/faas/run.py --device cuda on the 3 x 3 grid in the paper's setting (no keep-alive,
# steady state; Fig. 10), one repeat per cell, the whole zoo's row first (the only one whose
# models outgrow the budget, and so the one a time limit must not cut). Each cell is saved to
# $OUT/faas/faas.json as it is measured; at FAAS_TIMEOUT seconds (set it to the device call's
# limit less a minute) the run is interrupted, writes faas.md and the plots of what it
# measured, and stops its daemon and instances. FAAS_ARGS adds or overrides flags:
# FAAS_ARGS="--phases latency --no-grid" measures the per-model latency table (Fig. 7) instead.
# The device has no network: carry .whl with blake3 in it (bench/results/gpu/README.md).
set -u -o pipefail
. bench/device-env.sh || exit 1
# What the run needs, checked before minutes go into building the zoo.
python3 -c "import blake3, safetensors, torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'" \
  2>&1 | tee "$OUT/preflight.log" || exit 1
timeout -s INT -k 30 "${FAAS_TIMEOUT:-540}" python3 bench/faas/run.py --device cuda --zoo small --quick \
  --fractions 1,0.4,0.1 --repeats 1 --runs 1 --keep-alive 0 --warm-node --phases none --cache /tmp/trims-zoo \
  --out "$OUT/faas" ${FAAS_ARGS:-} 2>&1 | tee "$OUT/faas.log"
