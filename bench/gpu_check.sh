#!/bin/bash
# The GPU check on a lent GPU machine, which has no network: install the wheels carried in .whl/ (made here by
# bench/gpu_wheels.sh), then run bench/gpu_check.py. Results: $OUT/gpu_check.json (+ train.json, sample*.json and a
# log per step) where the device tool collects $OUT, else bench/results/gpu/. See docs/training.md, "GPU check".
#   device run: bash bench/gpu_check.sh          (carry [".whl"], timeout_s 540)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
t0=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "[gpu_check] install: $((SECONDS - t0)) s; $(python3 --version); $(nvidia-smi -L 2>/dev/null | head -1)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu_check.py --out "$out/gpu_check.json" --log-dir "$out" "$@"
