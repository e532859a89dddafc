#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (or nvidia-h200: the two streams then run one after the other).
# GPU 0: the kernel benchmark, tnlib and fla in the same run (wheels from .whl/: carry it), issue 3.
# GPU 1: the model benchmark with the compiled configuration of record (the whole model as one graph,
#   CUDA graphs, one SGLU product): tnl-385m compiled and eager at 2K/8K/32K, then the Transformer
#   compiled at 32K with the same settings (issue 4).
# Outputs land in $OUT/pending.tar.gz. Usage (pass the hash literally: the device copy's .git is stale):
#   run(command="TNLIB_COMMIT=<hash> bash scripts/device_pending.sh", kind="nvidia-h200-x2", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,clocks.max.sm,clocks.sm,power.limit,temperature.gpu --format=csv > "$W/gpus.csv"
python3 -m pip install -q --no-index --no-deps .whl/*.whl > "$W/pip.log" 2>&1
(export CUDA_VISIBLE_DEVICES=0
 timeout 330 python3 scripts/bench_kernels.py --impls tnlib,fla --long-first --long-heads 2 --out "$W" \
   > "$W/kernels.log" 2>&1
) &
[ "$NGPU" -lt 2 ] && wait
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 S="--loss fused --compile-scope model --compile-mode reduce-overhead --set tnlib.nn.gla.FUSED_SGLU=true"
 timeout 420 python3 scripts/bench_model.py --models tnl-385m --modes compiled,eager $S --out "$W/model-tnl.json" \
   > "$W/model-tnl.log" 2>&1
 timeout 100 python3 scripts/bench_model.py --models transformer-385m --modes compiled --lens 32768 $S \
   --out "$W/model-tfm.json" > "$W/model-tfm.log" 2>&1
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
cat "$W/gpus.csv"; tail -n 22 "$W/kernels.log"; grep -h "  fused loss\|ERROR" "$W"/model-*.log
