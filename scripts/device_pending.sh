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
 timeout 420 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused \
   --gla packed,unfused --out "$W/model-tnl-ab.json" > "$W/model-tnl-ab.log" 2>&1
 timeout 300 python3 scripts/bench_model.py --models tnl-385m --modes compiled,eager --lens 8192,32768,2048 --loss fused \
   --out "$W/model-tnl.json" > "$W/model-tnl.log" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 [ -f bench_tmp/act_bench.py ] && OUT="$W" timeout 100 python3 bench_tmp/act_bench.py > "$W/act-bench.log" 2>&1
 timeout 200 python3 scripts/tune_packed.py --out "$W" > "$W/tune-packed.log" 2>&1
 timeout 150 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile --fused-loss --top 40 --out "$W" \
   > "$W/profile.log" 2>&1; rm -f "$W"/trace-*.json
 timeout 150 python3 scripts/bench_model.py --models transformer-385m --modes compiled --lens 32768 --loss fused \
   --out "$W/model-transformer.json" > "$W/model-transformer.log" 2>&1) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 3 "$W/pytest-packed.log"; grep -v Warn "$W/act-bench.log"; tail -n 5 "$W"/model-*.log; grep -v "^ \|^{" "$W/tune-packed.log" | head; grep -A14 "CUDA kernels only" "$W"/profile-*.txt
