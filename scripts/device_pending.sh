#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200:
#   issue 3: narrower value blocks instead of segments (variants rows with narrow_bv: true)
#   issue 4: the chunked LM-head + cross-entropy loss (bench_model --loss logits,fused)
#   issue 5: decode-step compile variants (graph-fused-max, graph-fused-sum vs graph-fused)
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh")  (~7 min)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 150 python3 scripts/bench_kernels.py --variants-only --out "$OUT" --lens 1024,8192,16384,32768 \
  --shapes 16:128:128,32:64:64,8:256:128 --targets 512 > "$OUT/variants.log" 2>&1
timeout 120 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss logits,fused \
  --out "$OUT/model-pending.json" > "$OUT/model.log" 2>&1
timeout 180 python3 scripts/bench_inference.py --models tnl-385m --batches 1 --contexts 1024,65536 \
  --tnl-modes graph-fused,graph-fused-sum,graph-fused-max --decode-steps 30 --out "$OUT/inference-pending.json" \
  > "$OUT/inference.log" 2>&1
grep -h "narrow_bv': True" "$OUT/variants.log" | cut -c1-220
tail -n 4 "$OUT/model.log" "$OUT/inference.log"
