#!/usr/bin/env bash
# Every GPU check in one device call, sized to finish inside DEVICE_SECONDS (default 540, for a
# call of timeout_s=600 in a session of about 13 minutes of device time):
#   1. the GPU tests (at most 300 s);
#   2. the FaaS harness on the GPU (--device cuda), tiny zoo, the paper's setting: does that
#      path run end to end (at most 150 s; its figures are of toy models, not the paper's);
#   3. bench/gpu/run.py on ResNet-50, one repeat, with what time is left (its partial JSON is
#      kept if the limit cuts it).
# The device tool returns at most 8 files: the logs and tables come back as they are, and
# everything else packed in results.tgz. The full runs need sessions of their own:
# bench/gpu/device-check.sh and bench/faas/device-check.sh. Carry .whl with blake3 in it
# (bench/results/gpu/README.md).
set -u
started=$(date +%s)
left() { echo $(( ${DEVICE_SECONDS:-540} - ($(date +%s) - started) )); }
cap() { local l; l=$(( $(left) - 40 )); [ "$l" -lt 30 ] && l=30; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # 40 s kept for packing
. bench/device-env.sh || exit 1
TESTS=only TEST_TIMEOUT=$(cap 300) bash bench/gpu/device-check.sh
echo "== GPU tests done, $(left) s left"
FAAS_TIMEOUT=$(cap 150) FAAS_ARGS="--zoo tiny --fractions 1 --concurrency 1,2 --requests 12 --pool 3" \
  bash bench/faas/device-check.sh
echo "== FaaS on the GPU done, $(left) s left"
if [ "$(cap 600)" -gt 60 ]; then
  TESTS=none BENCH_TIMEOUT=$(cap 600) BENCH_ARGS="--models resnet50 --repeats 1" bash bench/gpu/device-check.sh
fi
echo "== bench/gpu done, $(left) s left"
cd "$OUT" || exit 1; mkdir -p kept && for f in faas/faas.md gpu.md; do [ -f "$f" ] && cp "$f" "kept/$(basename "$f")"; done
tar czf results.tgz --exclude=results.tgz --exclude=kept . && find . -mindepth 1 -maxdepth 1 \
  ! -name results.tgz ! -name kept ! -name gpu-tests.log ! -name nvidia-smi.txt -exec rm -rf {} + \
  && mv kept/* . 2>/dev/null; rmdir kept 2>/dev/null; ls -la
