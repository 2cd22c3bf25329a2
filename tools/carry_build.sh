#!/usr/bin/env bash
# Packs a local CUDA build's programs into ./build-carry, for a GPU machine call that carries them
# (the device tool's `carry`) instead of building there: the GPU machine then spends its minutes on
# running, not compiling. The binaries find torch through LD_LIBRARY_PATH there:
#   export LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")'):$PWD/build-carry
#   tools/carry_build.sh [BUILD_DIR]      # default ./build (built with STATEMAMBA_CUDA=ON)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
grep -q "STATEMAMBA_CUDA:BOOL=ON" "$build/CMakeCache.txt" || { echo "$build is not a CUDA build" >&2; exit 2; }
dest=$root/build-carry
rm -rf "$dest"
mkdir -p "$dest"
cp "$build/libstatemamba.so" "$build"/statemamba-* "$dest/"
for t in "$build"/tests/test_*; do [ -x "$t" ] && [ -f "$t" ] && cp "$t" "$dest/"; done
echo "$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+changes')" >"$dest/COMMIT"
du -sh "$dest"
