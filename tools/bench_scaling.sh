#!/usr/bin/env bash
# Data-parallel scaling of training (issue 6): the same per-GPU batch on 1 GPU and, through
# torchrun + DDP, on N GPUs; tokens/s = median over the steps after the compile warm-up.
# Usage (GPU machine with >= 2 GPUs):  bash tools/bench_scaling.sh OUT_DIR [preset] [steps] [phases]
# phases: any of 1 (one-GPU run), N (all-GPU run), report; default "1 N report".
# EXTRA="grad_accum=2 ddp_bucket_mb=100 fused_loss=true" adds TrainConfig settings to both runs.
# Writes OUT_DIR/scaling-<gpu>x<N>.json with provenance and both runs' medians.
set -uo pipefail
OUT=${1:?out dir}
PRESET=${2:-tnl-385m}
STEPS=${3:-50}
PHASES=${4:-1 N report}
DATA=${DATA:-/tmp/tnl-data}
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
export PYTHONUNBUFFERED=1 SEQ BATCH EXTRA DATA
mkdir -p "$OUT"
if [ ! -f $DATA/meta.json ]; then
  python3 -m tnlib prepare --corpus .carry/corpus-gutenberg-00.txt.xz --out $DATA --val-permille 10 \
    --tokenizer data/tokenizer-gutenberg-50272.json || exit 1
fi
SEQ=${SEQ:-2048}; BATCH=${BATCH:-16}
SET="seq_len=$SEQ batch_size=$BATCH lr=6e-4 max_steps=$STEPS warmup_steps=5 eval_every=100000 eval_sets=val eval_tokens=65536 ckpt_every=100000 compile=${COMPILE:-true} progress=false ${EXTRA:-}"
if [[ " $PHASES " == *" 1 "* ]]; then
  CUDA_VISIBLE_DEVICES=0 python3 -m tnlib train --preset $PRESET --data $DATA --out /tmp/scale-1 --set $SET || exit 1
fi
if [[ " $PHASES " == *" N "* ]]; then
  python3 -m torch.distributed.run --standalone --nproc_per_node=$NGPU -m tnlib train --preset $PRESET --data $DATA \
    --out /tmp/scale-$NGPU --set $SET || exit 1
fi
[[ " $PHASES " == *" report "* ]] || exit 0
python3 - "$OUT" "$PRESET" "$NGPU" "$STEPS" <<'PY'
import json, os, statistics, sys
from tnlib.provenance import gpu_slug, provenance
out, preset, n, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def med(path):
    recs = [json.loads(l) for l in open(path)]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 10]
    return statistics.median(tps), len(tps)
one, k1 = med("/tmp/scale-1/metrics.jsonl")
many, kn = med(f"/tmp/scale-{n}/metrics.jsonl")
doc = {"header": provenance({"preset": preset, "seq_len": int(os.environ.get("SEQ", 2048)), "batch_per_gpu": int(os.environ.get("BATCH", 16)), "steps": steps, "command": f"bash tools/bench_scaling.sh {out} {preset} {steps}", "extra": os.environ.get("EXTRA", ""), "data": os.environ.get("DATA", ""),
                             "method": "median tokens/s over steps 11..max (after the compile warm-up); "
                                       "same per-GPU batch, DDP through torchrun, torch.compile"}),
       "gpus_1": {"tokens_per_s": one, "steps_counted": k1},
       f"gpus_{n}": {"tokens_per_s": many, "steps_counted": kn},
       "scaling": many / one}
path = os.path.join(out, f"scaling-{gpu_slug()}x{n}.json")
json.dump(doc, open(path, "w"), indent=1)
print(json.dumps(doc, indent=1))
PY
