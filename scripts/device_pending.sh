#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call. With two GPUs
# (nvidia-h200-x2) the two streams run side by side, one per GPU; with one, one after the other.
#   GPU 0, issue 3: narrower value blocks instead of segments (variants rows with narrow_bv: true)
#          issue 4: the chunked LM-head + cross-entropy loss (bench_model --loss logits,fused) + its profile
#   GPU 1, issue 5: decode-step compile variants (graph-fused-max, graph-fused-sum vs graph-fused)
#          + kernel listing of one compiled decode step (einsum and sum)
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh")  (~7 min on x2)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
stream_a() {
  timeout 150 python3 scripts/bench_kernels.py --variants-only --out "$OUT" --lens 1024,8192,16384,32768 \
    --shapes 16:128:128,32:64:64,8:256:128 --targets 512 > "$OUT/variants.log" 2>&1
  timeout 120 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss logits,fused \
    --out "$OUT/model-pending.json" > "$OUT/model.log" 2>&1
  timeout 100 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --fused-loss --top 40 \
    --out "$OUT" > "$OUT/profile-model.log" 2>&1
}
stream_b() {
  timeout 170 python3 scripts/bench_inference.py --models tnl-385m --batches 1 --contexts 1024,65536 \
    --tnl-modes graph-fused,graph-fused-sum,graph-fused-max --decode-steps 30 --out "$OUT/inference-pending.json" \
    > "$OUT/inference.log" 2>&1
  timeout 80 python3 scripts/profile_decode.py --out "$OUT" > "$OUT/profile-decode.log" 2>&1
  timeout 80 python3 scripts/profile_decode.py --matvec sum --out "$OUT" > "$OUT/profile-decode-sum.log" 2>&1
}
if [ "$NGPU" -ge 2 ]; then
  (export CUDA_VISIBLE_DEVICES=0; stream_a) &
  (export CUDA_VISIBLE_DEVICES=1; stream_b) &
  wait
else
  stream_a; stream_b
fi
grep -h "narrow_bv': True" "$OUT/variants.log" | cut -c1-220
tail -n 4 "$OUT/model.log" "$OUT/inference.log"
head -n 4 "$OUT"/profile-decode-*.txt
