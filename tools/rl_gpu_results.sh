#!/usr/bin/env bash
# The RL results on a GPU machine for BENCHMARKS.md and the README, in one call of about eight minutes:
#   1. rollout throughput at 1024 environments, Mamba and GRU, eager and CUDA graph (JSON)
#   2. the seed expectation: both controllers on 4 bits at H = 1000, 2048 envs, 200 updates
#   3. the scale sweep: 4 bits, 128 envs (the gradient spans an episode: at H = 20000 that is 80 chunks to replay), H = 1000 5000 10000 20000, both controllers, 200 updates
# The ten training runs go at once, one process each (small policies leave the GPU mostly idle, so
# they share it well); each is bounded by its own --time-limit (it then saves its metrics, plot
# and checkpoint and exits normally) and by `timeout` around it. The sweep's runs write into one
# folder, then `--mode scale --report-only` over it writes the table and the plot.
# The gradient reaches back over enough chunks to cover an episode (--grad-chunks 0: automatic).
#
#   tools/rl_gpu_results.sh OUT_DIR [BIN_DIR]
# BIN_DIR: a build folder (statemamba-rl is brought up to date there) or prebuilt programs
# (tools/carry_build.sh's build-carry); default ./build-gpu. RL_TRAIN_SECONDS bounds each run (default 330);
# RL_EXTRA_ARGS adds flags to every training run (e.g. --gae-lambda 0.8).
set -uo pipefail
out=${1:?usage: tools/rl_gpu_results.sh OUT_DIR [BIN_DIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${2:-$root/build-gpu}" && pwd) || exit 2
if [ -f "$bin/build.ninja" ]; then
  timeout 900 cmake --build "$bin" --target statemamba-rl || { echo "building statemamba-rl in $bin failed" >&2; exit 2; }
else
  torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
  export LD_LIBRARY_PATH=$torch_lib:$bin:${LD_LIBRARY_PATH:-}
fi
rl=$bin/statemamba-rl
"$rl" --help | grep -q -- "--report-only" || { echo "$rl predates --report-only" >&2; exit 2; }
device=${STATEMAMBA_RL_DEVICE:-cuda}  # cpu only to try the script itself out
train_s=${RL_TRAIN_SECONDS:-330}
export OMP_NUM_THREADS=1  # ten processes on 16 cores
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null); programs $(cat "$bin/COMMIT" 2>/dev/null)"
  echo "extra training flags: ${RL_EXTRA_ARGS:-none}"
} >"$out/device.txt"

# run NAME SECONDS ARGS...: one bounded statemamba-rl call, its output in OUT/NAME.log.
run() {
  local name=$1 secs=$2
  shift 2
  timeout -s INT -k 20 "$secs" "$rl" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?: statemamba-rl $*" >>"$out/summary.log"
}

# 1. Throughput (env step + policy step + sampling + resets), 1024 envs, both controllers.
tp=(--mode throughput --device "$device" --num-envs 1024 --num-bits 4 --horizon 1000 --throughput-steps 500)
run throughput-eager 60 "${tp[@]}" --out "$out/throughput-eager"
if [ "$device" = cuda ]; then
  run throughput-graph 60 "${tp[@]}" --cuda-graph --out "$out/throughput-graph"
  run throughput-graph-decode 60 "${tp[@]}" --cuda-graph --decode-step --out "$out/throughput-graph-decode"
fi

# 2 and 3 at once.
# 256-step chunks of many environments: an update at H = 1000 then holds ~250 episodes per 1024
# envs. The defaults of statemamba-rl (GAE lambda 0.5, GRU chrono init, Mamba B/C scale 16) are
# the ones that made 4 bits learnable at H = 100 (BENCHMARKS.md).
common=(--device "$device" --num-bits 4 --rollout-len 256 --minibatches 2 --epochs 4 --total-updates 200
        --grad-chunks 0 --checkpoint-every 25 --time-limit "$train_s" ${RL_EXTRA_ARGS:-})
pids=()
for controller in mamba gru; do
  run "quick-$controller" $((train_s + 60)) --mode quick "${common[@]}" --controller "$controller" --horizon 1000 \
    --num-envs 2048 --out "$out/quick-$controller" &
  pids+=($!)
  for h in 1000 5000 10000 20000; do
    run "scale-$controller-h$h" $((train_s + 60)) --mode quick "${common[@]}" --controller "$controller" --horizon "$h" \
      --num-envs 128 --out "$out/scale" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done
run scale-table 120 --mode scale "${common[@]}" --num-envs 128 --horizons 1000 5000 10000 20000 \
  --report-only --out "$out/scale"

{
  echo "# RL results ($(head -n 1 "$out/device.txt"))"
  echo
  echo "## Throughput (1024 envs)"
  for f in "$out"/throughput-*/throughput.json; do
    [ -f "$f" ] && python3 - "$f" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    rate = r["env_steps_per_second"] / 1e6
    print(f"- {r['controller']}: {rate:.2f}M env-steps/s (graph {r['cuda_graph']}, decode ops {r['decode_step']})")
PY
  done
  echo
  echo "## 4 bits, H = 1000, 2048 envs"
  for c in mamba gru; do grep -E "accuracy .* after|stopped" "$out/quick-$c.log" 2>/dev/null | tail -n 2 | sed 's/^/    /'; done
  echo
  echo "## Scale (128 envs)"
  cat "$out/scale/results.md" 2>/dev/null || echo "(no table: see scale-table.log)"
  echo
  echo "total $(($(date +%s) - start)) s"
} >"$out/summary.md"
cat "$out/summary.md"
