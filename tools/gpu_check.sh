#!/usr/bin/env bash
# Everything the GPU side needs verified, on a CUDA machine with torch, triton, nvcc, cmake, pybind11 and
# scikit-build-core preinstalled and no network (design.md): installs nvCOMP and bitsandbytes from wheels placed
# beside the tree beforehand (wheels/, shared/wheels/, ../wheels/ or $FORGE_WHEELS), builds forge_rt._C with CUDA
# for the local GPU in-tree (no build isolation, no downloads), runs tests/gpu, then the quick bench suite on
# CUDA. Everything lands in one folder ($OUT, else gpu-check-<time>/) with summary.txt. Within 8 minutes.
#   tools/gpu_check.sh            the real run (needs a GPU)
#   tools/gpu_check.sh --dry-run  no GPU: checks the wheels, the build flags and the test selection
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
out=${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "[gpu_check] $*" | tee -a "$summary"; }
fail=0

# 1. Wheels: the first of each found in the wheel folders; a wheel is a zip, so check it opens.
dirs=()
for d in ${FORGE_WHEELS:-} wheels shared/wheels ../wheels; do [ -d "$d" ] && dirs+=("$d"); done
say "wheel folders: ${dirs[*]:-none}"
find_wheel() { for d in "${dirs[@]}"; do ls "$d"/$1 2>/dev/null; done | head -1; }
nvcomp=$( [ ${#dirs[@]} -gt 0 ] && find_wheel 'nvidia_libnvcomp_cu1[23]-*.whl' || true)
bnb=$( [ ${#dirs[@]} -gt 0 ] && find_wheel 'bitsandbytes-*.whl' || true)
for w in "$nvcomp" "$bnb"; do
  [ -n "$w" ] && ! "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()" "$w" 2>/dev/null \
    && { say "BROKEN wheel (not a zip): $w"; fail=1; }
done
say "nvCOMP wheel: ${nvcomp:-none found (GPU paging tests will skip)}"
say "bitsandbytes wheel: ${bnb:-none found (bitsandbytes baselines will skip)}"
install() { "$py" -m pip install --no-index --no-deps --no-build-isolation -q "$1"; }

# 2. Build flags: CUDA on, for this GPU's compute capability (dry run: FORGE_RT_CUDA_ARCHS or 90).
if [ $dry = 1 ]; then arch=${FORGE_RT_CUDA_ARCHS:-90}
else arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
fi
cmake_flags=(-DFORGE_RT_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch")
say "build: FORGE_BUILD_DIR=build/gpu tools/dev_build.sh ${cmake_flags[*]}"
for tool in nvcc cmake; do command -v $tool >/dev/null || { say "MISSING $tool"; fail=1; }; done
"$py" -c "import pybind11" 2>/dev/null || { say "MISSING pybind11"; fail=1; }

# 3. Test selection: tests/gpu, every test marked gpu.
"$py" -m pytest -p no:cacheprovider --collect-only -q -m gpu tests/gpu >"$out/gpu-tests.txt" 2>&1 || true
n=$(grep -c '::' "$out/gpu-tests.txt" || true)
say "GPU tests selected: $n (list in gpu-tests.txt)"
[ "$n" -gt 0 ] || fail=1
bench="$py -m forge_rt.bench --suite quick --device cuda --out $out"
say "bench: $bench"
if [ $dry = 1 ]; then
  say "dry run: $([ $fail = 0 ] && echo OK || echo FAILED)"
  exit $fail
fi

# The real run.
[ -n "$nvcomp" ] && install "$nvcomp" && say "installed $nvcomp"
[ -n "$bnb" ] && install "$bnb" && say "installed $bnb"
if FORGE_BUILD_DIR=build/gpu PYTHON="$py" bash tools/dev_build.sh "${cmake_flags[@]}" >"$out/build.log" 2>&1; then
  say "build: OK ($(PYTHONPATH=. "$py" -c 'import forge_rt._C as c; print(c.build_info())'))"
else
  say "build: FAILED (build.log)"; fail=1
fi
PYTHONPATH=. "$py" -m forge_rt.info >"$out/info.txt" 2>&1 || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if timeout 300 "$py" -m pytest -p no:cacheprovider -q -m gpu tests/gpu --junitxml="$out/gpu-tests.xml" \
    >"$out/gpu-tests.log" 2>&1; then say "GPU tests: $(tail -1 "$out/gpu-tests.log")"
else say "GPU tests: FAILED: $(tail -1 "$out/gpu-tests.log") (gpu-tests.log)"; fail=1
fi
if timeout 180 $bench >"$out/bench.log" 2>&1; then say "bench: $(tail -1 "$out/bench.log")"
else say "bench: FAILED or timed out (bench.log)"; fail=1
fi
say "done: $([ $fail = 0 ] && echo OK || echo FAILED), everything in $out"
exit $fail
