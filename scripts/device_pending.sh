#!/usr/bin/env bash
# The measurements prepared (and CPU-tested) but not yet timed on a GPU, in one call on nvidia-h200-x2
# (or nvidia-h200: the two streams then run one after the other).
# Issue 3: the single-launch segment states (tnlib.ops.lightning._FUSED_STATE) on the GPU: first its
#   tests (a hang would mean a wait that never ends: hence the timeout), then the segment-plan variants
#   with and without it at 1K and 32K (bench_kernels --variants-only). Issue 4: the dq / dk-dv epilogue
#   timings after its pre-activation load was moved up with the other loads (bench_act_kernels.py).
# Issue 4: tnl-385m compiled at T=2K with today's default, then with CUDA graphs for the blocks plus
#   one product for SGLU's two input projections plus coordinate-descent tuning, all together; and the
#   whole model as one compiled graph (lets Inductor fuse each block's last residual add with the next
#   block's norm).
# Everything lands in $OUT/pending.tar.gz (the device tool returns a handful of files per call).
# Usage (pass the hash literally: the device copy's .git may be stale):
#   run(command="TNLIB_COMMIT=<git rev-parse HEAD here> bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
(export CUDA_VISIBLE_DEVICES=0
 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_lightning.py -k "fused_segment or packed" \
   > "$W/pytest-fused.log" 2>&1
 OUT="$W" timeout 100 python3 scripts/bench_act_kernels.py > "$W/act-bench.log" 2>&1
 timeout 300 python3 scripts/bench_kernels.py --variants-only --targets 512,1024,2048 --out "$W" > "$W/variants.log" 2>&1
) &
[ "$NGPU" -lt 2 ] && wait  # one GPU: the two streams one after the other
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 B="timeout 200 python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused"
 $B --out "$W/model-default.json" > "$W/model-default.log" 2>&1
 $B --compile-mode reduce-overhead --inductor coordinate_descent_tuning=true --set tnlib.nn.gla.FUSED_SGLU=true \
   --out "$W/model-all.json" > "$W/model-all.log" 2>&1
 $B --compile-scope model --out "$W/model-scope.json" > "$W/model-scope.log" 2>&1
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 3 "$W/pytest-fused.log"; grep -v Warn "$W/act-bench.log"; grep -h "variant\|breakdown" "$W/variants.log" | cut -c1-220; grep -h "tnl-385m  " "$W"/model-*.log
