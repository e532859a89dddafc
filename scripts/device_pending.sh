#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (or nvidia-h200: the two streams then run one after the other).
# GPU 0: the kernel benchmark at the LRPE-layer shape, tnlib and fla in the same run (wheels from .whl/:
#   carry it), completing issue 3's table at this commit.
# GPU 1: tnl-385m compiled at T=2K, A/B/A/B on one machine: the per-block default against the
#   configuration of record (whole model, CUDA graphs, one SGLU product), to separate the
#   configuration's gain from machine-to-machine spread (issue 4).
# Outputs land in $OUT/pending.tar.gz. Usage (pass the hash literally: the device copy's .git is stale):
#   run(command="TNLIB_COMMIT=<hash> bash scripts/device_pending.sh", kind="nvidia-h200-x2", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit,temperature.gpu --format=csv > "$W/gpus.csv"
python3 -m pip install -q --no-index --no-deps .whl/*.whl > "$W/pip.log" 2>&1
(export CUDA_VISIBLE_DEVICES=0
 timeout 300 python3 scripts/bench_kernels.py --impls tnlib,fla --no-long-check --shapes 8:256:128 --out "$W" \
   > "$W/kernels-lrpe.log" 2>&1
) &
[ "$NGPU" -lt 2 ] && wait
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 M="python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused"
 S="--compile-scope model --compile-mode reduce-overhead --set tnlib.nn.gla.FUSED_SGLU=true"
 for i in 1 2; do
   timeout 80 $M --out "$W/ab-default-$i.json" > "$W/ab-default-$i.log" 2>&1
   timeout 90 $M $S --out "$W/ab-record-$i.json" > "$W/ab-record-$i.log" 2>&1
 done
) &
wait
tar -czf "$OUT/pending.tar.gz" -C "$W" .
cat "$W/gpus.csv"; tail -n 16 "$W/kernels-lrpe.log"; for f in "$W"/ab-*.log; do echo "$(basename $f) $(grep -h '  fused loss\|ERROR' $f)"; done
