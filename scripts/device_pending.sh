#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2.
#   phase A, side by side: GPU 0, issue 4: compiled tnl-385m at T=2K with the F.cross_entropy loss and
#            with the chunked loss (now one Triton kernel per chunk);
#            GPU 1, issue 5: the full inference benchmark (GEMV decode kernel in the captured step)
#   phase B, both GPUs, issue 6: 2-GPU scaling with per-block compilation (compile_scope=blocks)
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh",
#            kind="nvidia-h200-x2", carry=[".carry/scale-data"])
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(export CUDA_VISIBLE_DEVICES=0
 timeout 150 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss logits,fused \
   --out "$W/model-loss.json" > "$W/model-loss.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 330 python3 scripts/bench_inference.py --decode-steps 30 --tnl-modes graph-fused,graph,graph-fused-cublas,eager \
   --out "$W/inference-h200.json" > "$W/inference-h200.log" 2>&1) &
wait
DATA=.carry/scale-data EXTRA="compile_scope=blocks" timeout 240 bash scripts/bench_scaling.sh "$W/scaling-blocks" \
  > "$W/scaling-blocks.log" 2>&1
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 3 "$W/model-loss.log"; tail -n 32 "$W/inference-h200.log" | cut -c1-100; tail -n 22 "$W/scaling-blocks.log"
