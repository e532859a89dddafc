#!/usr/bin/env bash
# Next device call (prepared 2026-11-30, not yet run), on nvidia-h200-x2 (or nvidia-h200: the two
# streams then run one after the other):
# GPU 0: where the step of make bench-model's configuration goes: the whole model as one graph with
#   one SGLU product, profiled without CUDA graphs so that every kernel shows (issue 4's remaining 2%);
#   then the loss kernel's configurations (tune_xent.py: wider programs, and the one-read row kernel);
#   then the segment-state kernel's launch configurations at 16K/32K (issue 3: it reads at ~3.2 TB/s).
# GPU 1: tnl-385m compiled at T=2K in that configuration (with CUDA graphs), A/B/A/B against the same
#   with a bf16 residual stream (ModelConfig.residual_dtype="compute", opt-in): what the fp32 stream's
#   traffic costs; the A runs also place the machine against the run of record (196.1K; machines differ
#   by up to 4%, results/bench/NOTES-kernels.md); and the LM head's weight gradient accumulated by
#   mixed-precision GEMMs (tnlib.ops.loss._DW_FP32_GEMM). Run the GPU tests of tests/test_loss.py first
#   if that switch is to become a default.
# Outputs land in $OUT/pending.tar.gz. Usage (pass the hash literally: the device copy's .git is stale):
#   run(command="TNLIB_COMMIT=<hash> bash scripts/device_pending.sh", kind="nvidia-h200-x2")
set -uo pipefail
OUT=${OUT:-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
S="--compile-scope model --set tnlib.nn.gla.FUSED_SGLU=true"
(export CUDA_VISIBLE_DEVICES=0
 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py > "$W/pytest-loss.log" 2>&1
 timeout 240 python3 scripts/profile_model.py --preset tnl-385m --T 2048 --compile $S --fused-loss --top 40 \
   --out "$W" > "$W/profile.log" 2>&1
 timeout 120 python3 scripts/tune_xent.py --out "$W" > "$W/xent.log" 2>&1
 timeout 120 python3 scripts/tune_segment_states.py --out "$W" > "$W/segment-states.log" 2>&1
) &
[ "$NGPU" -lt 2 ] && wait
(export CUDA_VISIBLE_DEVICES=$((NGPU - 1))
 R="python3 scripts/bench_model.py --models tnl-385m --modes compiled --lens 2048 --loss fused $S --compile-mode reduce-overhead"
 for i in 1 2; do
   timeout 85 $R --out "$W/record-$i.json" > "$W/record-$i.log" 2>&1
   timeout 85 $R --override 'residual_dtype="compute"' --out "$W/bf16res-$i.json" > "$W/bf16res-$i.log" 2>&1
   timeout 85 $R --set tnlib.nn.gla.FUSED_SGLU=true,tnlib.ops.loss._DW_FP32_GEMM=true \
     --out "$W/dwfp32-$i.json" > "$W/dwfp32-$i.log" 2>&1
 done
) &
wait
rm -f "$W"/trace-*.json  # large; the table is enough
tar -czf "$OUT/pending.tar.gz" -C "$W" .
tail -n 2 "$W/pytest-loss.log"; grep -A45 "CUDA kernels only" "$W/profile.log" | head -50; grep "config" "$W/xent.log"; grep "tb_per_s\|error" "$W/segment-states.log"; for f in "$W"/record-*.log "$W"/bf16res-*.log "$W"/dwfp32-*.log; do echo "$(basename $f) $(grep -h '  fused loss\|ERROR' $f)"; done
