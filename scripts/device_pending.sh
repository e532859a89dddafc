#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2.
# Issue 4, the packed token-mixer path (feature map inside the Lightning kernels, one gradient buffer):
# GPU 0, the model benchmark of tnl-385m (compiled at 2K/8K/32K and eager at 2K with the packed path,
# compiled 2K also unfused for an A/B in the same process); GPU 1, the kernels at the model's attention
# shape (packed vs unfused, config sweep), a compiled training-step profile, then the Transformer at 32K.
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(export CUDA_VISIBLE_DEVICES=0
 B="timeout 200 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused"
 $B --out "$W/model-default.json" > "$W/model-default.log" 2>&1
 $B --compile-mode reduce-overhead --out "$W/model-ro.json" > "$W/model-ro.log" 2>&1
 $B --inductor coordinate_descent_tuning=true --out "$W/model-cdt.json" > "$W/model-cdt.log" 2>&1
 $B --compile-mode reduce-overhead --inductor coordinate_descent_tuning=true --out "$W/model-ro-cdt.json" > "$W/model-ro-cdt.log" 2>&1
 $B --set tnlib.nn.gla.FUSED_SGLU=true --out "$W/model-sglu.json" > "$W/model-sglu.log" 2>&1
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
grep -h "tnl-385m  " "$W"/model-*.log; grep -h "ERROR\|Error" "$W"/model-*.log | tail -5
