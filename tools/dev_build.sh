#!/usr/bin/env bash
# In-tree developer build: compiles forge_rt._C into forge_rt/ so the tree runs with PYTHONPATH=.
# FORGE_BUILD_DIR keeps parallel builds apart; extra args go to cmake configure.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
bdir=${FORGE_BUILD_DIR:-build/dev}
cmake -S . -B "$bdir" -DFORGE_RT_INPLACE=ON -DPython_EXECUTABLE="$(command -v "$py")" "$@" >/dev/null
cmake --build "$bdir" -j 2
