#!/usr/bin/env bash
# The model benchmark of record on one H200 (nvidia-h200, nothing else running): make bench-model's
# configuration, tnl-385m compiled and eager at T = 2K/8K/32K, the Transformer compiled at 32K (the 2.5x
# target), then a kernel-level profile of the tnl-385m step at 2K (same configuration, no CUDA graphs).
# Usage: run(command="TNLIB_COMMIT=<hash> bash scripts/device_record.sh", kind="nvidia-h200")
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S="--compile-scope model --compile-mode reduce-overhead"
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit,temperature.gpu --format=csv > "$OUT/gpus.txt"
timeout 330 python3 scripts/bench_model.py --models tnl-385m --modes compiled,eager --loss fused $S \
  --out "$OUT/model-tnl.json" > "$OUT/model-tnl.log" 2>&1
timeout 100 python3 scripts/bench_model.py --models transformer-385m --modes compiled --lens 32768 --loss fused $S \
  --out "$OUT/model-tfm.json" > "$OUT/model-tfm.log" 2>&1
tail -n 7 "$OUT/model-tnl.log"; tail -n 1 "$OUT/model-tfm.log"
timeout 120 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --compile-scope model \
  --fused-loss --top 40 --out "$OUT" > "$OUT/profile.log" 2>&1
rm -f "$OUT"/trace-*.json
grep -A22 "CUDA kernels only" "$OUT/profile.log" | head -24
