#!/usr/bin/env bash
# Decode A/B in one GPU call: the model's graph decode (bf16, mamba-130m shape) with overlapped
# launches off and on (STATEMAMBA_OVERLAP=0/1, programmatic dependent launch of the decode
# kernels), and optionally a second build's programs, alternating so that drift hits every
# variant alike. Writes one JSON per run to OUT_DIR and prints tokens/s per batch (mean of runs).
#   tools/gpu_decode_ab.sh BIN_DIR OUT_DIR [BATCHES] [ROUNDS]      # BIN_DIR holds statemamba-bench
#   BASE_BIN=build-old tools/gpu_decode_ab.sh ...                   # also that build, overlap as it does
set -uo pipefail
bin=${1:?usage: tools/gpu_decode_ab.sh BIN_DIR OUT_DIR [BATCHES] [ROUNDS]}
out=${2:?usage: tools/gpu_decode_ab.sh BIN_DIR OUT_DIR [BATCHES] [ROUNDS]}
batches=${3:-1,2,4,8,16,32,64,256}
rounds=${4:-2}
mkdir -p "$out"
variants=("new-overlap0|$bin|0" "new-overlap1|$bin|1")
[ -n "${BASE_BIN:-}" ] && variants=("base|$BASE_BIN|1" "${variants[@]}")
for ((round = 1; round <= rounds; ++round)); do
  for v in "${variants[@]}"; do
    IFS='|' read -r name dir overlap <<<"$v"
    echo "round $round: $name" >&2
    STATEMAMBA_OVERLAP=$overlap "$dir/statemamba-bench" --model --device cuda --dtype bfloat16 --prefill-batch 1 \
      --prompt-length 256 --decode-batches "$batches" --decode-steps 64 --graphs -r 5 \
      >"$out/decode_${name}_r$round.json" 2>"$out/decode_${name}_r$round.err" || echo "  $name failed: $?" >&2
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os, collections
out = sys.argv[1]
tps = collections.defaultdict(lambda: collections.defaultdict(list))
for f in sorted(glob.glob(os.path.join(out, "decode_*_r*.json"))):
    name = os.path.basename(f)[len("decode_"):].rsplit("_r", 1)[0]
    try:
        text = open(f).read(); doc = json.loads(text[text.index("{"):])
    except Exception as e:
        print("unreadable", f, e); continue
    for c in doc.get("cases", []):
        if c.get("phase") == "decode" and c.get("mode") == "graph":
            tps[name][c["batch"]].append(c["tokens_per_s"])
names = list(tps)
batches = sorted({b for n in names for b in tps[n]})
print("graph decode bf16, tokens/s (mean of runs)")
print("batch " + "".join(f"{n:>16s}" for n in names) + ("   overlap1/overlap0" if {"new-overlap0", "new-overlap1"} <= set(names) else ""))
for b in batches:
    means = {n: sum(tps[n][b]) / len(tps[n][b]) for n in names if tps[n][b]}
    row = f"{b:5d} " + "".join(f"{means.get(n, 0):16.0f}" for n in names)
    if "new-overlap0" in means and "new-overlap1" in means:
        row += f"   {means['new-overlap1'] / means['new-overlap0']:.3f}"
    print(row)
PY
