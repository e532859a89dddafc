#!/usr/bin/env bash
# One nvidia-h200-x2 call (2026-11-30): (1) the training-quality check that a bf16 residual stream needs
# before it can become the default: tnl-385m trained twice on the same tokens, residual stream in fp32
# (residual_dtype=params) and in bf16 (residual_dtype=compute), one per GPU (scripts/device_385m.sh);
# (2) then throughput pairs at T=2K in make bench-model's configuration, same machine:
#   GPU 0: the LM-head loss as one chunk op (tnlib.ops.loss._CHUNK_OP, new default) vs the in-place op
#          between PyTorch products (the previous code), both with the fp32 stream;
#   GPU 1: chunk op with the bf16 stream vs chunk op with the fp32 stream.
# Needs .carry/ (see device_385m.sh): carry=[".carry/corpus-gutenberg-00.txt.xz", ...].
# Usage: run(command="TNLIB_COMMIT=<hash> TOKENS=24000000 bash scripts/device_ab.sh", kind="nvidia-h200-x2", carry=[...])
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
MAX_MIN=${MAX_MIN:-4.5} EVALS=${EVALS:-val,eval-heldout,eval-wikitext-valid} \
  bash scripts/device_385m.sh "${TOKENS:-24000000}" tnl-385m+residual_dtype=params tnl-385m+residual_dtype=compute \
  > "$OUT/quality.log" 2>&1
echo "quality A/B: rc $? after $(( $(date +%s) - t0 )) s"
tail -n 8 "$OUT/quality.log"
R="python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused --compile-scope model
   --compile-mode reduce-overhead"
S=tnlib.nn.gla.FUSED_SGLU=true
(export CUDA_VISIBLE_DEVICES=0
 timeout 95 $R --set $S,tnlib.ops.loss._CHUNK_OP=false --override 'residual_dtype="params"' --out "$OUT/tp-inplace-fp32res.json" > "$OUT/tp-inplace-fp32res.log" 2>&1
 timeout 95 $R --set $S --override 'residual_dtype="params"' --out "$OUT/tp-chunkop-fp32res.json" > "$OUT/tp-chunkop-fp32res.log" 2>&1
) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 95 $R --set $S --override 'residual_dtype="compute"' --out "$OUT/tp-chunkop-bf16res.json" > "$OUT/tp-chunkop-bf16res.log" 2>&1
 timeout 95 $R --set $S --override 'residual_dtype="params"' --out "$OUT/tp-chunkop-fp32res-gpu1.json" > "$OUT/tp-chunkop-fp32res-gpu1.log" 2>&1
) &
wait
for f in "$OUT"/tp-*.log; do echo "$(basename $f) $(grep -h '  fused loss\|ERROR' $f)"; done
echo "total $(( $(date +%s) - t0 )) s"
