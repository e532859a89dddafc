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
 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_lightning.py tests/test_model.py -k "packed" > "$W/pytest-packed.log" 2>&1
 for kc in "" "dq=32,64,4,2" "dkdv=64,8,1"; do
   timeout 150 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused \
     --kernel-config "$kc" --out "$W/model-tnl-kc${kc:0:2}.json" >> "$W/model-tnl-kc.log" 2>&1
 done) &
NGPU=$(nvidia-smi -L | wc -l)
[ "$NGPU" -lt 2 ] && wait  # one GPU: the two streams one after the other
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 [ -f bench_tmp/act_bench.py ] && OUT="$W" timeout 100 python3 bench_tmp/act_bench.py > "$W/act-bench.log" 2>&1
  timeout 150 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --fused-loss --top 40 --out "$W" \
   > "$W/profile.log" 2>&1; rm -f "$W"/trace-*.json
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 3 "$W/pytest-packed.log"; grep -v Warn "$W/act-bench.log"; grep -h "tnl-385m  " "$W"/model-*.log; grep -A3 "GPU busy" "$W"/profile-*.txt; grep -A14 "CUDA kernels only" "$W"/profile-*.txt
