#!/usr/bin/env bash
# One model of the 385M comparison on a lent GPU machine (no internet, no `datasets`), in one call.
#
# Here, before the call (the machine cannot see ../shared; the working tree may carry 64 MB):
#   mkdir -p .carry && cp ../shared/data/corpus-gutenberg-0[0-2].txt.xz ../shared/data/gutenberg-heldout.txt.xz \
#      ../shared/data/wikitext103-valid.txt ../shared/data/wikitext103-test.txt .carry/   # ~46 MB
#   echo /.carry/ >> .git/info/exclude
# Then, per model (each fits one 10-minute call at ~160K tokens/s):
#   run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash scripts/device_385m.sh tnl-385m 40000000", carry=[".carry"])
#   run(command="... bash scripts/device_385m.sh transformer-385m 40000000", carry=[".carry"])
# and copy the returned files into runs/385m/<model>/ before running
#   python -m tnlib compare --runs tnl=runs/385m/tnl-385m transformer=runs/385m/transformer-385m --out results/385m ...
set -euo pipefail
MODEL=${1:?model preset}
TOKENS=${2:?token budget}
OUT=${OUT:-out}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-16}
LR=${LR:-6e-4}
export PYTHONUNBUFFERED=1
DATA=/tmp/tnl-data
if [ ! -f $DATA/meta.json ]; then
  python3 -m tnlib prepare --corpus .carry/corpus-gutenberg-*.txt.xz --out $DATA --val-permille 10 \
    --tokenizer data/tokenizer-gutenberg-50272.json \
    --eval heldout=.carry/gutenberg-heldout.txt.xz wikitext-valid=.carry/wikitext103-valid.txt \
           wikitext-test=.carry/wikitext103-test.txt
fi
cp $DATA/meta.json $OUT/data-meta.json
STEPS=$(( TOKENS / (SEQ * BATCH) ))
python3 -m tnlib train --preset "$MODEL" --data $DATA --out /tmp/runs/$MODEL --set \
  seq_len=$SEQ batch_size=$BATCH lr=$LR max_steps=$STEPS warmup_steps=$(( STEPS / 50 + 1 )) \
  eval_every=$(( STEPS / 10 + 1 )) eval_tokens=524288 ckpt_every=100000 compile=true progress=false \
  eval_sets=val,eval-heldout,eval-wikitext-valid,eval-wikitext-test
cp /tmp/runs/$MODEL/metrics.jsonl $OUT/$MODEL-metrics.jsonl
