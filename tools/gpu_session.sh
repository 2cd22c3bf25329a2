#!/usr/bin/env bash
# The one GPU session: builds the CUDA targets in ./build-gpu, runs the CUDA tests, a
# compute-sanitizer memcheck over a representative filter, and the op and model benchmarks, within
# a time budget (default 450 s including the build). Writes three files to the output folder:
#   gpu_summary.txt  each step's exit status and seconds, the test verdicts, the benchmark tables
#   gpu_logs.txt     configure, build, test, memcheck and benchmark logs, one after another
#   gpu_bench.json   {"ops": <statemamba-bench JSON>, "model": <statemamba-bench --model JSON>}
# and leaves the build in ./build-gpu (tools/rl_gpu_results.sh builds on it in the same call).
#
#   tools/gpu_session.sh "$OUT"            # on the GPU machine, from the repository root
#   tools/gpu_session.sh --dry-run [OUT]   # print each step's command without running it
#   GPU_SESSION_BIN=build-carry tools/gpu_session.sh "$OUT"   # no build: the programs that
#                                          # tools/carry_build.sh packed here and the call carried
# Environment: GPU_SESSION_BUDGET_S (seconds for everything, default 450), GPU_SESSION_JOBS
# (build jobs, default 16), GPU_SESSION_BIN (prebuilt programs, see above), GPU_SESSION_OPS_BENCH=0
# (skip the op benchmark).
set -uo pipefail  # no -e: a failing step is recorded and the session goes on

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
out=${1:-${OUT:-}}
if [ -z "$out" ]; then
  echo "usage: tools/gpu_session.sh [--dry-run] OUT_DIR   (or set OUT)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
build=$root/build-gpu
prebuilt=${GPU_SESSION_BIN:-}
if [ -n "$prebuilt" ]; then
  prebuilt=$(cd "$prebuilt" && pwd) || exit 2
  torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")' 2>/dev/null)
  export LD_LIBRARY_PATH=$torch_lib:$prebuilt:${LD_LIBRARY_PATH:-}
fi
bin_dir=${prebuilt:-$build}          # statemamba-bench
tests_dir=${prebuilt:-$build/tests}  # the test programs
work=$build/gpu_session  # intermediate files; only the three above go to $out
mkdir -p "$work"
rm -f "$work"/*

budget=${GPU_SESSION_BUDGET_S:-450}
jobs=${GPU_SESSION_JOBS:-16}
summary=$out/gpu_summary.txt
logs=$out/gpu_logs.txt
: >"$summary"
: >"$logs"
start=$SECONDS

note() { echo "$*" >>"$summary"; }
left() { echo $((budget - (SECONDS - start))); }

# Moves finished steps' log sections into gpu_logs.txt (steps run in the background write theirs
# at once, so they are moved after the wait).
flush_logs() {
  local f
  for f in "$work"/*.section; do
    [ -f "$f" ] || continue
    cat "$f" >>"$logs"
    rm -f "$f"
  done
}

# step NAME CAP_S LOGFILE CMD...: runs CMD under `timeout` for min(CAP_S, time left), output to
# LOGFILE (appended to gpu_logs.txt afterwards), and records its exit status and seconds.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit
  limit=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -lt 5 ]; then
    note "$(printf '%-28s skipped: out of time' "$name")"
    return 124
  fi
  if [ $dry_run = 1 ]; then
    note "$(printf '%-28s would run (limit %ss): %s' "$name" "$limit" "$*")"
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  {
    echo "===== $name (exit $rc, $((SECONDS - t0)) s, limit $limit s): $*"
    cat "$log"
    echo
  } >"$log.section"
  [ -n "${STEP_IN_BACKGROUND:-}" ] || flush_logs
  local verdict=ok
  [ $rc -ne 0 ] && verdict="FAILED"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT"
  note "$(printf '%-28s %-9s exit %3d  %4d s' "$name" "$verdict" "$rc" "$((SECONDS - t0))")"
  return $rc
}

note "statemamba GPU session, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + working-tree changes')"
if [ $dry_run = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$summary" 2>&1
fi

# ---- build -----------------------------------------------------------------------------------------
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || echo "")
cmake_args=(-S "$root" -B "$build" -G Ninja -Wno-dev -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DPython3_EXECUTABLE="$(command -v python3)"
  -DSTATEMAMBA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
[ -x /usr/local/cuda/bin/nvcc ] && cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
cuda_tests=(test_cuda_ops test_cuda_graph_decoder test_cuda_mixer_step test_cuda_rl)
if [ -n "$prebuilt" ]; then
  note "prebuilt programs from $prebuilt ($(cat "$prebuilt/COMMIT" 2>/dev/null)); no build"
else
  step configure 120 "$work/configure.log" cmake "${cmake_args[@]}"
  # -k 0: a target that fails to build leaves the others building.
  step build 330 "$work/build.log" cmake --build "$build" -j "$jobs" --target statemamba statemamba-bench \
    statemamba-rl "${cuda_tests[@]}" -- -k 0
  if [ $dry_run = 0 ]; then grep -E "error|FAILED" "$work/build.log" | head -20 >>"$summary"; fi
fi

# ---- tests (the three programs at once; each ctest case would be a process of its own) -------------
test_pids=()
for t in "${cuda_tests[@]}"; do
  if [ $dry_run = 1 ] || [ -x "$tests_dir/$t" ]; then
    STEP_IN_BACKGROUND=1 step "test $t" 150 "$work/$t.log" "$tests_dir/$t" --gtest_brief=1 &
    test_pids+=($!)
  else
    note "$(printf '%-28s NOT BUILT' "test $t")"
  fi
done
for pid in "${test_pids[@]}"; do wait "$pid"; done
flush_logs
if [ $dry_run = 0 ]; then
  for t in "${cuda_tests[@]}"; do
    [ -f "$work/$t.log" ] && grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$work/$t.log" |
      sed "s/^/  $t: /" | head -40 >>"$summary"
  done
fi

# ---- model benchmark (the issue's model figures) ----------------------------------------------------
bench=$bin_dir/statemamba-bench
step "bench model bf16" 120 "$work/bench_model.json" \
  "$bench" --model --device cuda --dtype bfloat16 --prefill-batch 8 --prompt-length 2048 \
  --decode-batches 1,64 --decode-steps 64 --graphs -r 5

# ---- memcheck over a representative filter ------------------------------------------------------------
# Each program gets its own share of the step's time, so one slow program leaves the others a verdict.
memcheck() {
  local rc=0 prog filter
  for spec in \
    "test_cuda_ops|CudaDecode.*:CudaScanResets.*:CudaConvResets.*:CudaScanChunking.*:CudaConvChunking.*:CudaAddRmsNorm.*" \
    "test_cuda_mixer_step|*MixerStepCuda.*/bf16:MixerStepCudaOnly.*" \
    "test_cuda_graph_decoder|*StateRoundTrips*/bf16:CudaGraphDecoder.RejectsBadArguments"; do
    prog=${spec%%|*} filter=${spec#*|}
    echo "--- memcheck $prog --gtest_filter='$filter'"
    timeout 45 compute-sanitizer --tool memcheck --error-exitcode 9 "$tests_dir/$prog" --gtest_brief=1 \
      --gtest_filter="$filter" || rc=$?
  done
  return $rc
}
if [ $dry_run = 1 ]; then
  note "$(printf '%-28s would run: compute-sanitizer memcheck on test_cuda_ops, test_cuda_mixer_step, test_cuda_graph_decoder (filtered)' memcheck)"
else
  export -f memcheck
  export tests_dir
  step memcheck 150 "$work/memcheck.log" bash -c memcheck
  grep -E "^--- memcheck|ERROR SUMMARY|^\[  (PASSED|FAILED) " "$work/memcheck.log" | head -20 | sed 's/^/  /' >>"$summary"
fi

# ---- op benchmark (BENCHMARKS.md's command) ----------------------------------------------------------
if [ "${GPU_SESSION_OPS_BENCH:-1}" = 1 ]; then
  step "bench ops" 120 "$work/bench_ops.json" \
    "$bench" --device cuda --dtype float32 --dtype bfloat16 -b 8 -d 1536 -l 2048 -n 16 --decode-batch 64 -r 15
else
  note "bench ops: skipped (GPU_SESSION_OPS_BENCH=0)"
fi

# ---- bundle the benchmarks and print the tables ----------------------------------------------------
if [ $dry_run = 0 ]; then
  python3 - "$work" "$out/gpu_bench.json" >>"$summary" 2>&1 <<'PY'
import json, sys, os
work, dest = sys.argv[1], sys.argv[2]
def load(name):
    # statemamba-bench prints progress to stderr (in the same log) and one JSON document to stdout.
    try:
        text = open(os.path.join(work, name)).read()
        return json.loads(text[text.index('{\n'):])
    except Exception as e:
        return {"error": f"{name}: {e}"}
ops, model = load("bench_ops.json"), load("bench_model.json")
json.dump({"ops": ops, "model": model}, open(dest, "w"), indent=1)
print("\nops (median ms, x HBM floor); copy GB/s:", round(ops.get("copy_GBps", 0)))
for c in ops.get("cases", []):
    print(f"  {c['op']:52s} {c['dtype']:9s} {c['median_ms']:8.4f}  x{c.get('floor_ratio', 0):5.2f}")
print("model (tokens/s; vs mamba_ssm; vs target; x floor):")
for c in model.get("cases", []):
    name = f"{c['phase']} {c.get('mode', '')} {c['dtype']} B{c['batch']}" + (f" L{c['length']}" if 'length' in c else "")
    extra = "".join(f"  {k} {c[k]:.2f}" for k in ("vs_official", "vs_target", "floor_ratio") if k in c)
    print(f"  {name:40s} {c['tokens_per_s']:12.0f}{extra}")
for name, d in (("ops", ops), ("model", model)):
    if "error" in d: print("  ", name, d["error"])
PY
fi
note "total $((SECONDS - start)) s of a ${budget} s budget; build left in $build"
echo "----- summary ($summary) -----"
cat "$summary"
