# Sourced by the device-check scripts: the environment on a machine with a CUDA GPU and no
# network. Wheels it lacks (blake3) come in .whl/ (see bench/results/gpu/README.md); results go
# to $OUT (the device tool's folder), else /tmp/trims-device-out.
OUT=${OUT:-/tmp/trims-device-out}
mkdir -p "$OUT"
[ -n "${TRIMS_DEVICE_ENV:-}" ] && return 0  # set up already, by the script that called this one
export TRIMS_DEVICE_ENV=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels (.whl) failed" >&2; return 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
