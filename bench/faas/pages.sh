#!/usr/bin/env bash
# The paper's setting (no keep-alive, steady state) at its best point (40% of the zoo, concurrency
# 1), run twice back to back: with the host tier in 4 KiB pages (the kernel's shmem_enabled=never)
# and in 2 MiB pages (advise, which trims asks for with MADV_HUGEPAGE). Needs root; puts the
# setting back on exit. About 15 minutes here. Results: bench/results/faas/pages-{4kib,2mib}/;
# PAGES_ARGS adds or overrides run.py flags.
set -eu
cd "$(dirname "$0")/../.."
SETTING=/sys/kernel/mm/transparent_hugepage/shmem_enabled
before=$(sed -n 's/.*\[\(.*\)\].*/\1/p' "$SETTING")
trap 'echo "$before" > "$SETTING"' EXIT
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
for pages in 4kib:never 2mib:advise; do
  echo "${pages#*:}" > "$SETTING"
  "$PYTHON" bench/faas/run.py --keep-alive 0 --warm-node --fractions 0.4 --concurrency 1 --phases none \
    --out "bench/results/faas/pages-${pages%%:*}" ${PAGES_ARGS:-}
done
