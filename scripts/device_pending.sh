#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call. With two GPUs
# (nvidia-h200-x2) the two streams run side by side, one per GPU; with one, one after the other.
#   GPU 0, issue 5: the full inference benchmark with the GEMV decode kernel (graph-fused default,
#          graph-fused-cublas = the same step with cuBLAS projections, eager), then a decode-step kernel listing
#   GPU 1, issue 4: where a compiled training step's time goes, with and without the chunked loss
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage: run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
stream_a() {
  timeout 420 python3 scripts/bench_inference.py --decode-steps 30 --tnl-modes graph-fused,graph-fused-cublas,eager \
    --out "$W/inference-h200.json" > "$W/inference-h200.log" 2>&1
  timeout 60 python3 scripts/profile_decode.py --out "$W" > "$W/profile-decode.log" 2>&1
}
stream_b() {
  timeout 110 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --top 40 --out "$W" \
    > "$W/profile-model.log" 2>&1
  timeout 110 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --fused-loss --top 40 \
    --out "$W" > "$W/profile-model-fused.log" 2>&1
  rm -f "$W"/trace-*.json
}
if [ "$NGPU" -ge 2 ]; then
  (export CUDA_VISIBLE_DEVICES=0; stream_a) &
  (export CUDA_VISIBLE_DEVICES=1; stream_b) &
  wait
else
  stream_a; stream_b
fi
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 30 "$W/inference-h200.log"
head -n 4 "$W"/profile-decode-*.txt
grep -h "summed kernel time" "$W"/profile-tnl-*.txt
