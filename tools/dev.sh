#!/usr/bin/env bash
# statemamba's one entry point for people and CI: set up, build, then run a job.
#   tools/dev.sh demo    set up, build and run the main job: statemamba-rl --mode quick (PPO training of a
#                        Mamba policy on the delayed-memory task; extra arguments go to statemamba-rl)
#   tools/dev.sh test    set up, build and run the whole test suite (what .ci/run does)
#   tools/dev.sh build   set up and build only
# Environment: STATEMAMBA_BUILD (build folder, default ./build), STATEMAMBA_CUDA (ON/OFF),
# CMAKE_CUDA_ARCHITECTURES (default 90), STATEMAMBA_JOBS (parallel build jobs).
set -euo pipefail
job=${1:-build}; shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/tools/setup.sh")
build=${STATEMAMBA_BUILD:-$root/build}
python=$venv/bin/python

export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-10G}

cmake_args=(-S "$root" -B "$build" -G Ninja -Wno-dev
  -DCMAKE_PREFIX_PATH="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  -DPython3_EXECUTABLE="$python"
  -DSTATEMAMBA_CUDA="${STATEMAMBA_CUDA:-ON}"
  -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}")
[ -x /usr/local/cuda/bin/nvcc ] && cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
mkdir -p "$build"
cmake "${cmake_args[@]}" >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "${STATEMAMBA_JOBS:-$(nproc)}"

case "$job" in
  build) ;;
  test) cd "$build" && ctest --output-on-failure -j "$(nproc)" "$@" ;;
  demo)
    out=(--out "$root/out/rl-demo")
    for arg in "$@"; do case "$arg" in --out|--out=*) out=() ;; esac; done
    "$build/statemamba-rl" --mode quick "${out[@]}" "$@" ;;
  *) echo "usage: tools/dev.sh build|test|demo" >&2; exit 2 ;;
esac
