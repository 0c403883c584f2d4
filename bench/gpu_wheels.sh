#!/bin/bash
# Fill .whl/ (ignored by git; the device tool carries it with carry [".whl"]) with what bench/gpu_check.sh needs beyond
# the GPU machine's image (Python 3.12, x86-64, no network): DeepSpeed, built here as a pure-Python wheel without
# compiled ops (the trainer uses torch AdamW and needs none), and the dependencies the image lacks (hjson, pydantic
# and its own). Versions are the ones installed in VENV, so the GPU runs what the tests here run. ~5 MB.
#   bash bench/gpu_wheels.sh [VENV]       (default .venv; needs network and VENV's torch to build DeepSpeed)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py=$venv/bin/python
version() { "$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
mkdir -p .whl
rm -f .whl/*.whl
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w .whl
pins=()
for name in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
    pins+=("$name==$(version "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
