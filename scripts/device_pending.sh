#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (or nvidia-h200: the two streams then run one after the other).
# GPU 0: every Lightning test on the GPU (incl. the model-sized K=256 launch that faulted at 5cd664c),
#   then the kernel benchmark with fla (wheels from .whl/: carry it) for issue 3's figures.
# GPU 1: tnl-385m training throughput for issue 4: CUDA graphs (reduce-overhead) + one SGLU product at
#   T = 2K/8K/32K, the Transformer at 32K with the same settings, the whole-model graph with and
#   without them at 2K, and today's default at 2K as the same-session baseline.
# Outputs land in $OUT/pending.tar.gz. Usage (pass the hash literally: the device copy's .git is stale):
#   run(command="TNLIB_COMMIT=<hash> bash scripts/device_pending.sh", kind="nvidia-h200-x2", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
pip install -q --no-index --no-deps .whl/*.whl > "$W/pip.log" 2>&1
(export CUDA_VISIBLE_DEVICES=0
 timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_lightning.py > "$W/pytest-lightning.log" 2>&1
 timeout 300 python3 scripts/bench_kernels.py --impls tnlib,fla --long-first --long-heads 2 --out "$W" \
   > "$W/kernels.log" 2>&1
) &
[ "$NGPU" -lt 2 ] && wait
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 M="python3 scripts/bench_model.py --modes compiled --loss fused"
 G="--compile-mode reduce-overhead --set tnlib.nn.gla.FUSED_SGLU=true"
 timeout 170 $M --models tnl-385m --lens 2048,8192,32768 $G --out "$W/model-graphs.json" > "$W/model-graphs.log" 2>&1
 timeout 80 $M --models transformer-385m --lens 32768 $G --out "$W/model-tfm-graphs.json" > "$W/model-tfm.log" 2>&1
 timeout 80 $M --models tnl-385m --lens 2048 --out "$W/model-default.json" > "$W/model-default.log" 2>&1
 timeout 90 $M --models tnl-385m --lens 2048 --compile-scope model --out "$W/model-scope.json" > "$W/model-scope.log" 2>&1
 timeout 90 $M --models tnl-385m --lens 2048 --compile-scope model $G --out "$W/model-scope-graphs.json" \
   > "$W/model-scope-graphs.log" 2>&1
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 3 "$W/pytest-lightning.log"; tail -n 45 "$W/kernels.log"; grep -h "  fused loss" "$W"/model-*.log; grep -h ERROR "$W"/model-*.log
