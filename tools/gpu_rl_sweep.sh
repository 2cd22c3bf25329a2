#!/usr/bin/env bash
# Several statemamba-rl training runs at once on one GPU (small policies leave it mostly idle), each
# bounded by --time-limit, then a summary of each run's final and best accuracy (summary.json, and
# one line each on stdout) and one plot per run (statemamba-rl writes it).
#   tools/gpu_rl_sweep.sh BIN_DIR OUT_DIR SECONDS 'NAME: FLAGS...' ['NAME: FLAGS...' ...]
# BIN_DIR: tools/carry_build.sh's build-carry (or a build folder). Every run also gets
# --device cuda --time-limit SECONDS --out OUT_DIR/NAME; its output is in OUT_DIR/NAME.log.
# Example: tools/gpu_rl_sweep.sh build-carry out 300 'mamba: --controller mamba --horizon 1000 --curriculum 16'
set -uo pipefail
bin=${1:?usage: tools/gpu_rl_sweep.sh BIN_DIR OUT_DIR SECONDS 'NAME: FLAGS' ...}
out=${2:?usage: tools/gpu_rl_sweep.sh BIN_DIR OUT_DIR SECONDS 'NAME: FLAGS' ...}
seconds=${3:?usage: tools/gpu_rl_sweep.sh BIN_DIR OUT_DIR SECONDS 'NAME: FLAGS' ...}
shift 3
[ $# -ge 1 ] || { echo "gpu_rl_sweep: no runs given" >&2; exit 2; }
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH=$torch_lib:$bin:${LD_LIBRARY_PATH:-}
export OMP_NUM_THREADS=1  # several processes share the machine's cores
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "programs $(cat "$bin/COMMIT" 2>/dev/null)"
} >"$out/device.txt"
pids=()
for spec in "$@"; do
  name=${spec%%:*} flags=${spec#*:}
  # shellcheck disable=SC2086 # the flags are meant to split into words
  timeout -s INT -k 20 $((seconds + 90)) "$bin/statemamba-rl" --mode quick --device cuda --time-limit "$seconds" \
    --out "$out/$name" $flags >"$out/$name.log" 2>&1 &
  pids+=($!)
  echo "$name: statemamba-rl $flags" >>"$out/runs.txt"
done
for pid in "${pids[@]}"; do wait "$pid"; done
python3 - "$out" <<'PY'
import glob, json, math, os, sys
out = sys.argv[1]
summary = {}
for f in sorted(glob.glob(os.path.join(out, "*", "*-h*.json"))):
    doc = json.load(open(f))
    h = doc["history"]
    if not h:
        continue
    window = doc["config"]["accuracy_window"]
    task_length = doc["config"]["horizon"] + 2
    full = [s["accuracy"] for s in h if s["accuracy"] is not None and s["window_answers"] >= window
            and s["episode_length"] == task_length]
    last = h[-1]
    seconds = sum(s["seconds"] for s in h)
    run = os.path.basename(os.path.dirname(f))
    summary[run] = {"updates": last["update"], "final_accuracy": last["accuracy"], "best_accuracy": max(full) if full else None,
                    "episode_length": last["episode_length"], "env_steps": last["env_steps"], "seconds": seconds,
                    "env_steps_per_second": last["env_steps"] / seconds if seconds else None,
                    "first_update_at_task_length": next((s["update"] for s in h if s["episode_length"] == task_length), None)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for run, s in summary.items():
    best = "-" if s["best_accuracy"] is None else f"{s['best_accuracy']:.3f}"
    final = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.3f}"
    print(f"{run:28s} updates {int(s['updates']):4d}  episode length {int(s['episode_length']):6d}  final {final}  best {best}  "
          f"{s['seconds']:.0f} s  {s['env_steps_per_second'] / 1e3:.0f}k env-steps/s  full task from update {s['first_update_at_task_length']}")
PY
