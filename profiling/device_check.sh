#!/usr/bin/env bash
# The device check as one command, on the GPU machine's image as it is: nothing is installed (the
# repository is put on PYTHONPATH); the JSON goes to $OUT (else profiling/results). Any arguments go to
# profiling/device_check.py (e.g. --stages kernels,engine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import jax; print("jax", jax.__version__, "devices", jax.devices())'
exec python3 profiling/device_check.py "$@"
