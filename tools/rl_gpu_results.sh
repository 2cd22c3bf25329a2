#!/usr/bin/env bash
# The RL results on a GPU machine, in about four minutes, for BENCHMARKS.md and the README:
#   1. rollout throughput at 1024 environments, Mamba and GRU, with and without a CUDA graph (JSON)
#   2. quick runs of both controllers on 4 bits at H = 1000 (as many updates as fit, up to 200)
#   3. a reduced scale sweep (H = 5000 and 20000, both controllers, a few updates each)
# Mamba gets the most time: on CPU, 4 bits at H = 16 took 166 updates of 64 envs to reach 0.8.
# Every run is bounded twice: the program's own --time-limit (it then writes its metrics, plot and
# checkpoint and exits normally) and `timeout` around it (SIGINT, which also saves, then KILL).
#
#   tools/rl_gpu_results.sh OUT_DIR [BUILD_DIR]      # BUILD_DIR defaults to ./build-gpu
#
# It first brings BUILD_DIR's statemamba-rl up to date (cmake --build --target statemamba-rl).
# OUT_DIR gets one folder per step (metrics .csv/.json, accuracy.png, results.md/.csv,
# throughput.json), a .log per step, device.txt, and summary.md collecting the numbers.
set -uo pipefail
out=${1:?usage: tools/rl_gpu_results.sh OUT_DIR [BUILD_DIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${2:-$root/build-gpu}
rl=$build/statemamba-rl
[ -f "$build/build.ninja" ] || { echo "no build in $build: build first (STATEMAMBA_BUILD=$build tools/dev.sh build)" >&2; exit 2; }
# Brings statemamba-rl up to date with this checkout (incremental; not counted in the four minutes).
timeout 900 cmake --build "$build" --target statemamba-rl || { echo "building statemamba-rl in $build failed" >&2; exit 2; }
"$rl" --help | grep -q -- "--cuda-graph" || { echo "$rl predates the throughput mode" >&2; exit 2; }
device=${STATEMAMBA_RL_DEVICE:-cuda}  # cpu only to try the script itself out
graph=(--cuda-graph)
[ "$device" = cuda ] || graph=()
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)

# run NAME SECONDS ARGS...: one bounded statemamba-rl call, its output in OUT/NAME.log.
run() {
  local name=$1 secs=$2
  shift 2
  echo "== $name ($(($(date +%s) - start)) s in): statemamba-rl $*" | tee -a "$out/summary.log"
  timeout -s INT -k 20 "$secs" "$rl" "$@" --out "$out/$name" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc; $(tail -n 3 "$out/$name.log" | tr '\n' ' ')" | tee -a "$out/summary.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
  nproc
} >"$out/device.txt"

# 1. Throughput (env step + policy step + sampling + resets), 1024 envs, both controllers.
tp=(--mode throughput --device "$device" --num-envs 1024 --num-bits 4 --horizon 1000 --throughput-steps 500)
# graph: the rollout step as PPO runs it (scan ops over one step); decode: the decode ops (fused on CUDA)
[ ${#graph[@]} -gt 0 ] && run throughput-graph 60 "${tp[@]}" "${graph[@]}"
run throughput-eager 60 "${tp[@]}"
[ ${#graph[@]} -gt 0 ] && run throughput-graph-decode 60 "${tp[@]}" "${graph[@]}" --decode-step

# 2. Quick runs: 4 bits, H = 1000. The chunk (1024 steps) plus --grad-chunks 2 lets the gradient
# reach back from every query to its episode's start (episodes are 1002 steps long).
quick=(--mode quick --device "$device" --num-bits 4 --horizon 1000 --num-envs 256 --rollout-len 1024
       --minibatches 2 --epochs 4 --grad-chunks 2 --total-updates 200 --checkpoint-every 50)
run quick-mamba 110 "${quick[@]}" --controller mamba --time-limit 90
run quick-gru 65 "${quick[@]}" --controller gru --time-limit 45

# 3. Reduced scale sweep, with what time is left (about 50 s).
left=$((230 - ($(date +%s) - start)))
if [ "$left" -gt 40 ]; then
  per_run=$(((left - 20) / 4))
  run scale 100 --mode scale --device "$device" --num-bits 4 --num-envs 64 --horizons 5000 20000 --rollout-len 1024 \
    --minibatches 2 --grad-chunks 2 --total-updates 200 --time-limit "$per_run"
else
  echo "== scale: skipped, $left s left" | tee -a "$out/summary.log"
fi

# Summary: the numbers the README and BENCHMARKS.md want.
{
  echo "# RL results ($(head -n 2 "$out/device.txt" | tail -n 1))"
  echo
  echo "## Throughput (1024 envs)"
  for f in "$out"/throughput-*/throughput.json; do
    [ -f "$f" ] && echo '```json' && cat "$f" && echo '```'
  done
  echo
  echo "## Quick runs, 4 bits, H = 1000"
  for d in quick-mamba quick-gru; do
    echo; echo "$d:"; grep -E "accuracy .* after|stopped|plot:" "$out/$d.log" 2>/dev/null | sed 's/^/    /'
  done
  echo
  echo "## Scale (reduced)"
  [ -f "$out/scale/results.md" ] && cat "$out/scale/results.md"
  echo
  echo "total $(($(date +%s) - start)) s"
} >"$out/summary.md"
cat "$out/summary.md"
