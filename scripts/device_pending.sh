#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2.
# Issue 4, the packed token-mixer path (feature map inside the Lightning kernels, one gradient buffer):
# GPU 0, the model benchmark of tnl-385m (compiled at 2K/8K/32K and eager at 2K with the packed path,
# compiled 2K also unfused for an A/B in the same process); GPU 1, the kernels at the model's attention
# shape (packed vs unfused, config sweep), a compiled training-step profile, then the Transformer at 32K.
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage (pass the hash literally: the device copy's .git may be stale):
#   run(command="TNLIB_COMMIT=<git rev-parse HEAD here> bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(export CUDA_VISIBLE_DEVICES=0
 timeout 330 python3 scripts/bench_model.py --models tnl-385m --modes compiled,eager --loss fused \
   --out "$W/model-tnl.json" > "$W/model-tnl.log" 2>&1
 timeout 120 python3 scripts/bench_model.py --models transformer-385m --modes compiled --lens 32768 --loss fused \
   --out "$W/model-transformer.json" > "$W/model-transformer.log" 2>&1
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
grep -h "tnl-385m  " "$W"/model-*.log; grep -h "ERROR\|Error" "$W"/model-*.log | tail -5
