#!/usr/bin/env bash
# Per-kernel GPU time of the model's prefill and eager decode step, from Nsight Compute (ncu), on a
# 2-layer mamba-130m-shape model (every layer launches the same kernels, so two show the pattern
# and keep ncu's replays short). Writes OUT/kernels.csv (launch order, kernel, grid, block, µs)
# and prints a per-phase summary (prefill: both forwards; decode: the steps at each batch).
#   tools/gpu_profile.sh BIN_DIR OUT_DIR      # BIN_DIR holds statemamba-bench (a build or build-carry)
set -uo pipefail
bin=${1:?usage: tools/gpu_profile.sh BIN_DIR OUT_DIR}
out=${2:?usage: tools/gpu_profile.sh BIN_DIR OUT_DIR}
mkdir -p "$out"
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --log-file "$out/ncu.csv" \
  "$bin/statemamba-bench" --model --device cuda --dtype bfloat16 --layers 2 --prefill-batch 8 --prompt-length 2048 \
  --decode-batches 1,64 --decode-steps 2 -r 1 >"$out/bench.json" 2>"$out/bench.err"
echo "ncu exit $?"
python3 - "$out" <<'PY'
import csv, sys, os, re, collections
out = sys.argv[1]
rows = []
with open(os.path.join(out, "ncu.csv")) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    name = re.sub(r"\(.*", "", r["Kernel Name"])[:90]
    rows.append((int(r["ID"]), name, r["Grid Size"], r["Block Size"], float(r["Metric Value"].replace(",", "")) / 1e3))
with open(os.path.join(out, "kernels.csv"), "w") as f:
    w = csv.writer(f); w.writerow(["id", "kernel", "grid", "block", "us"]); w.writerows(rows)
print(len(rows), "kernels; total", round(sum(r[4] for r in rows)), "us")
agg = collections.OrderedDict()
for r in rows:
    a = agg.setdefault(r[1], [0, 0.0]); a[0] += 1; a[1] += r[4]
for k, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{us:10.1f} us {n:5d}x  {k}")
PY
