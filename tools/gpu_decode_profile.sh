#!/usr/bin/env bash
# Where decode time goes, in one GPU call (carried programs in build-carry):
#  1. graph decode at B1 against model depth and vocabulary (per-layer slope and fixed cost);
#  2. ncu kernel durations of eager decode steps at B1 and B64 on a 2-layer model, L2 kept warm
#     (--cache-control none), as a replayed step finds it.
#   tools/gpu_decode_profile.sh OUT_DIR
set -uo pipefail
out=${1:?usage: tools/gpu_decode_profile.sh OUT_DIR}
bin=build-carry
export LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")'):$PWD/$bin
mkdir -p "$out"
for cfg in "24 50280" "12 50280" "2 50280" "24 256"; do
  set -- $cfg
  "$bin/statemamba-bench" --model --device cuda --dtype bfloat16 --layers $1 --vocab $2 --prefill-batch 1 \
    --prompt-length 16 --decode-batches 1,64 --decode-steps 64 --graphs -r 5 >"$out/slope_$1_$2.json" 2>/dev/null
  python3 -c "
import json,sys; d=json.load(open('$out/slope_$1_$2.json'))
for c in d['cases']:
    if c['phase']=='decode' and c['mode']=='graph': print('layers $1 vocab $2 B%d: %.1f us/step' % (c['batch'], c['ms_per_step']*1e3))"
done
ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --log-file "$out/ncu.csv" "$bin/statemamba-bench" --model --device cuda --dtype bfloat16 --layers 2 \
  --prefill-batch 1 --prompt-length 16 --decode-batches 1,64 --decode-steps 2 -r 1 >/dev/null 2>&1
python3 - "$out/ncu.csv" <<'PY'
import csv, sys, re
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = [(re.sub(r"\(.*", "", r["Kernel Name"])[:60], r["Grid Size"], float(r["Metric Value"].replace(",", "")) / 1e3)
        for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
print(len(rows), "kernels; the last 80:")
for name, grid, us in rows[-80:]: print(f"{us:8.2f} us  {grid:14s} {name}")
PY
