#!/usr/bin/env bash
# The GPU checks for a machine with a CUDA GPU and no network: the GPU tests (about 2.5 min on
# a fresh machine), then the evidence benchmark (about 9 min). TESTS=first (default), last,
# only or none; BENCH_ARGS passes flags to bench/gpu/run.py. Wheels the machine lacks
# (blake3) come in .whl/ (see bench/results/gpu/README.md).
set -u
. bench/device-env.sh || exit 1
run_tests() {
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_store.py \
    "tests/test_tiers.py::TestGpuTierLogic" "$@" 2>&1 | tee -a "$OUT/gpu-tests.log"
}
case "${TESTS:-first}" in first|only) run_tests ;; esac
[ "${TESTS:-first}" = only ] && exit 0
timeout "${BENCH_TIMEOUT:-600}" python3 bench/gpu/run.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
[ "${TESTS:-first}" = last ] && run_tests ${TEST_FILTER:+-k "$TEST_FILTER"}
