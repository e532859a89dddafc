#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2.
# Issue 4, compiled at T=2K with the chunked loss: GPU 0, tnl-385m with the blocks compiled in
# max-autotune-no-cudagraphs mode plus coordinate-descent tuning; GPU 1, transformer-385m with
# coordinate-descent tuning (the baseline under the same Inductor setting as tnl-385m's earlier row).
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(export CUDA_VISIBLE_DEVICES=0
 timeout 330 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused \
   --compile-mode max-autotune-no-cudagraphs --inductor coordinate_descent_tuning=true \
   --out "$W/model-tnl-max.json" > "$W/model-tnl-max.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 200 python3 scripts/bench_model.py --models transformer-385m --modes compiled --lens 2048,32768 --loss fused \
   --inductor coordinate_descent_tuning=true --out "$W/model-transformer-cdt.json" > "$W/model-transformer-cdt.log" 2>&1) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 4 "$W"/model-*.log
