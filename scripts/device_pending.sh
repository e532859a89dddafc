#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2.
# Issue 4: the model benchmark with the chunked loss (one Triton kernel per chunk), both models side by
# side (GPU 0: tnl-385m, GPU 1: transformer-385m), eager and compiled at T = 2K, 8K, 32K; then on GPU 0
# compiled tnl-385m at 2K once more with Inductor's coordinate-descent tuning of its generated kernels.
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(export CUDA_VISIBLE_DEVICES=0
 timeout 300 python3 scripts/bench_model.py --models tnl-385m --modes compiled,eager --loss fused \
   --out "$W/model-tnl.json" > "$W/model-tnl.log" 2>&1
 timeout 200 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused \
   --inductor coordinate_descent_tuning=true --out "$W/model-tnl-cdt.json" > "$W/model-tnl-cdt.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 400 python3 scripts/bench_model.py --models transformer-385m --modes compiled,eager --loss fused \
   --out "$W/model-transformer.json" > "$W/model-transformer.log" 2>&1) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 8 "$W"/model-*.log
