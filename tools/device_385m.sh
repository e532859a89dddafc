#!/usr/bin/env bash
# The 385M comparison on a lent GPU machine (no internet, no `datasets`), in one call: prepares the
# carried shards once, then trains each model on its own GPU at the same time (one after the other
# when there is a single GPU), on the same tokens, and writes a short greedy sample from each.
#
# Here, before the call (the machine cannot see ../shared; the working tree may carry 64 MiB):
#   mkdir -p .carry && cp ../shared/data/corpus-gutenberg-0[0-2].txt.xz ../shared/data/gutenberg-heldout.txt.xz .carry/
#   xz -9 -c ../shared/data/wikitext103-valid.txt > .carry/wikitext103-valid.txt.xz   # and -test
#   plus a document-aligned prefix of shard 03 (117 of 135 books, re-compressed: .carry/corpus-gutenberg-03-part.txt.xz)
#   echo /.carry/ >> .git/info/exclude
# Then, on nvidia-h200-x2:
#   run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash tools/device_385m.sh 45000000 tnl-385m transformer-385m",
#       carry=[".carry"])
# (a model may carry config overrides, e.g. `tnl-385m tnl-385m+residual_dtype=compute` trains the same
# preset both ways on the same tokens), and copy the returned files into runs/385m/<model>/ before running
#   python -m tnlib compare --runs tnl=runs/385m/tnl-385m transformer=runs/385m/transformer-385m --out results/385m ...
set -euo pipefail
TOKENS=${1:?token budget}
shift
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || { echo "usage: $0 TOKENS MODEL [MODEL...]" >&2; exit 2; }
OUT=${OUT:-out}
mkdir -p "$OUT"
SEQ=${SEQ:-2048}
BATCH=${BATCH:-16}
LR=${LR:-6e-4}
MAX_MIN=${MAX_MIN:-7.5}  # safety stop so that metrics always come back inside a 10-minute call
PROMPT=${PROMPT:-"It was a dark and stormy night; the rain fell in torrents, except"}
export PYTHONUNBUFFERED=1
DATA=${DATA:-/tmp/tnl-data}
if [ ! -f $DATA/meta.json ]; then
  t0=$(date +%s)
  python3 -m tnlib prepare --corpus .carry/corpus-gutenberg-*.txt.xz --out $DATA --val-permille 10 \
    --tokenizer data/tokenizer-gutenberg-50272.json \
    --eval heldout=.carry/gutenberg-heldout.txt.xz wikitext-valid=.carry/wikitext103-valid.txt.xz \
           wikitext-test=.carry/wikitext103-test.txt.xz
  echo "prepare: $(( $(date +%s) - t0 )) s"
fi
cp $DATA/meta.json $OUT/data-meta.json
STEPS=$(( TOKENS / (SEQ * BATCH) ))
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "training ${MODELS[*]} for $STEPS steps of $(( SEQ * BATCH )) tokens on $NGPU GPU(s)"

run_name() { echo "$1" | tr '+=,' '___'; }  # file names the device tool returns: no + = ,

train_one() {  # model gpu; a model is a preset, optionally with model overrides: tnl-385m+residual_dtype=compute,gate=false
  local preset=${1%%+*} over=() name
  [ "$preset" != "$1" ] && IFS=, read -ra over <<< "${1#*+}"
  name=$(run_name "$1")
  CUDA_VISIBLE_DEVICES=$2 python3 -m tnlib train --preset "$preset" --data $DATA --out /tmp/runs/$name \
    ${over[@]:+--model "${over[@]}"} --set \
    seq_len=$SEQ batch_size=$BATCH lr=$LR max_steps=$STEPS warmup_steps=$(( STEPS / 50 + 1 )) \
    eval_every=$(( STEPS / 10 + 1 )) eval_tokens=524288 ckpt_every=100000 compile=true progress=false \
    max_minutes=$MAX_MIN eval_sets=${EVALS:-val,eval-heldout,eval-wikitext-valid,eval-wikitext-test} \
    > $OUT/$name-train.log 2>&1 || { echo "$1: training failed"; tail -n 20 $OUT/$name-train.log; return 1; }
  CUDA_VISIBLE_DEVICES=$2 python3 -m tnlib generate --checkpoint /tmp/runs/$name/final \
    --tokenizer data/tokenizer-gutenberg-50272.json --prompt "$PROMPT" --max-new-tokens 80 --temperature 0 \
    > $OUT/$name-sample.txt 2>>$OUT/$name-train.log || true
}

pids=()
rc=0
for i in "${!MODELS[@]}"; do
  if [ "$NGPU" -gt 1 ]; then
    train_one "${MODELS[$i]}" $(( i % NGPU )) &
    pids+=($!)
  else
    train_one "${MODELS[$i]}" 0 || rc=1
  fi
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for m in "${MODELS[@]}"; do
  n=$(run_name "$m")
  cp /tmp/runs/$n/metrics.jsonl $OUT/$n-metrics.jsonl 2>/dev/null || true
  tail -n 3 $OUT/$n-train.log
done
exit $rc
