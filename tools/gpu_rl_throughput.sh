#!/usr/bin/env bash
# RL rollout throughput on a GPU machine in one call: the CUDA RL tests (rl/kernels.h against the
# torch-op code, graph replay against eager steps), then `statemamba-rl --mode throughput` at
# 1024 environments (4-bit memory, H = 1000; Mamba and GRU; CUDA graph; Mamba with the decode ops
# and with the scan ops), alternating with a second build's programs when BASE_BIN is set, then
# the per-kernel times of a few eager steps from Nsight Compute.
#   tools/gpu_rl_throughput.sh BIN_DIR OUT_DIR [ROUNDS]        # BIN_DIR: build-carry or a build
#   BASE_BIN=build-base tools/gpu_rl_throughput.sh ...
set -uo pipefail
bin=${1:?usage: tools/gpu_rl_throughput.sh BIN_DIR OUT_DIR [ROUNDS]}
out=${2:?usage: tools/gpu_rl_throughput.sh BIN_DIR OUT_DIR [ROUNDS]}
rounds=${3:-2}
mkdir -p "$out"
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH=$torch_lib:$bin:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/device.txt" 2>&1
echo "programs $(cat "$bin/COMMIT" 2>/dev/null); base $(cat "${BASE_BIN:-/nonexistent}/COMMIT" 2>/dev/null)" >>"$out/device.txt"
"$bin/test_cuda_rl" >"$out/test_cuda_rl.log" 2>&1; echo "test_cuda_rl exit $?" | tee -a "$out/device.txt"
tail -3 "$out/test_cuda_rl.log"
variants=("new|$bin")
[ -n "${BASE_BIN:-}" ] && variants=("base|$BASE_BIN" "${variants[@]}")
args=(--mode throughput --device cuda --num-envs 1024 --num-bits 4 --horizon 1000 --throughput-steps 2000 --cuda-graph)
for ((round = 1; round <= rounds; ++round)); do
  for v in "${variants[@]}"; do
    IFS='|' read -r name dir <<<"$v"
    for step in decode scan; do
      extra=(); [ "$step" = decode ] && extra=(--decode-step)
      LD_LIBRARY_PATH=$torch_lib:$dir "$dir/statemamba-rl" "${args[@]}" "${extra[@]}" --out "$out/tp_${name}_${step}_r$round" \
        >/dev/null 2>"$out/tp_${name}_${step}_r$round.err" || echo "  $name $step failed: $?" >&2
    done
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os, collections
out = sys.argv[1]
rates = collections.defaultdict(list)
for f in sorted(glob.glob(os.path.join(out, "tp_*_r*/throughput.json"))):
    name = os.path.basename(os.path.dirname(f)).rsplit("_r", 1)[0][3:]
    for r in json.load(open(f))["results"]:
        rates[(name, r["controller"])].append(r["env_steps_per_second"])
summary = {f"{n} {c}": {"runs": v, "mean": sum(v) / len(v)} for (n, c), v in sorted(rates.items())}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for k, v in summary.items():
    print(f"{k:24s} {v['mean'] / 1e6:7.2f}M env-steps/s  runs " + " ".join(f"{x / 1e6:.2f}" for x in v["runs"]))
PY
# Per-kernel times of eager steps (a graph replays the same kernels).
if command -v ncu >/dev/null; then
  ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file "$out/ncu.csv" \
    "$bin/statemamba-rl" --mode throughput --device cuda --num-envs 1024 --num-bits 4 --horizon 1000 --controller mamba \
    --decode-step --throughput-steps 3 --out "$out/ncu_run" >/dev/null 2>"$out/ncu.err"
  python3 - "$out" <<'PY'
import csv, sys, os, re
out = sys.argv[1]
lines = [l for l in open(os.path.join(out, "ncu.csv")) if l.startswith('"')]
rows = [(int(r["ID"]), re.sub(r"\(.*", "", r["Kernel Name"])[:80], float(r["Metric Value"].replace(",", "")) / 1e3)
        for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
# The last of the 23 steps (20 warm-up + 3 timed): kernels from the last env-step kernel back.
print(len(rows), "kernels profiled")
with open(os.path.join(out, "kernels.csv"), "w") as f:
    w = csv.writer(f); w.writerow(["id", "kernel", "us"]); w.writerows(rows)
tail = rows[-40:]
for r in tail: print(f"{r[2]:8.2f} us  {r[1]}")
PY
fi
