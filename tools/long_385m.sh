#!/usr/bin/env bash
# 385M training runs on a lent GPU machine (no internet, no `datasets`), over chained device calls: issue 16's
# TNL-385M vs Transformer-385M on the same >= 80M tokens, and issue 26's fair experiment (tools/fair_385m.py
# gives the run specs of its stages). Recipe: the library's defaults (blocks compiled, chunked loss, bf16
# autocast); T=2048, batch 16 = 32,768 tokens/step, AdamW (LR, default 6e-4), warmup steps/50+1, cosine to 10%;
# sampled evaluations every ~5M tokens (TRAIN_EVALS, EVAL_TOKENS each); once a run is trained, its final
# weights are scored on the *whole* of every eval set the data has (tools/long_385m.py final), with greedy
# samples if SAMPLES=1.
#
# MODELS: run specs, one after the other: NAME[=PRESET[:KEY=VALUE...]], where KEY is a TrainConfig field
# (--set), m.FIELD a ModelConfig field (--model) and tokens=N the run's own token budget (default TOKENS).
# A bare preset name is its own run (e.g. "tnl-385m"). Runs go to $ROOT/runs/NAME.
#   e.g. MODELS="tnl-fp32=tnl-385m:m.residual_dtype=params:lr=6e-4:tokens=24000000"
#
#   stage   copies the carried data part(s) (.carry-long-K/) to $ROOT on the machine (checked with sha256sum)
#   prepare stages, then tokenizes once every part is there (optional: `start` does it too; run on its own
#           it lets the same call use the idle GPU meanwhile, e.g. for a benchmark)
#   start   stages what this call carries; once every part is there: tokenizes, snapshots the code, starts the
#           driver in its own session (setsid nohup: it outlives the call) and follows it like `status`. After
#           "all done", another `start` with new MODELS runs more in the same lease (finished runs are skipped)
#   status  follows the driver for up to WAIT s (returns early when it ends), prints step, tokens, latest eval
#           and ETA of each run, and packs $OUT/long385.tar.gz (metrics, logs, final evals of every run on the
#           machine) and $OUT/progress.txt. Repeat until it prints "all done".
#   stop    SIGTERM to the training process(es): each writes its checkpoint and stops; `start` resumes
#
# The runs train one after the other on one GPU, side by side (one per GPU) on two. The driver resumes a
# run from $ROOT/runs/<name>/checkpoint (written every CKPT_EVERY_TOKENS and on SIGTERM) after a crash or
# `stop`, while the machine is held; a run's checkpoint and weights are deleted once its final evals are
# written. What is lost if the machine goes back: everything on it; only what the last call packed survives.
# A fresh machine starts over from `stage`.
#
# Data: 64 MiB travel per call, with the working tree (~42 MB by 2026-12-06: take `results/logs` out of the
# tree for the `stage` calls and `git checkout -- results/logs` before `start`), so ~27 MB of data per call: the
# >= 80M distinct training tokens (shards 00-06, 98.7 MB of xz) travel in 4 parts: whole shards, and
# shards cut at a document boundary (re-compressed pieces). Here, once (~10 min on 2 cores):
#   python tools/long_385m_carry.py --shards ../shared/data/corpus-gutenberg-0[0-6].txt.xz \
#     --heldout ../shared/data/gutenberg-heldout.txt.xz \
#     --wikitext ../shared/data/wikitext103-valid.txt ../shared/data/wikitext103-test.txt \
#     --parts 4 --max-bytes 27000000 --out .carry-long
#   grep -qx '/.carry-long-\*/' .git/info/exclude || echo '/.carry-long-*/' >> .git/info/exclude
# Then on nvidia-h200 or nvidia-h100-x1, chained calls, each issued at once:
#   run(command="bash tools/long_385m.sh stage", carry=[".carry-long-1"], timeout_s=120)   # and -2, -3
#   run(command="MODELS=... TNLIB_COMMIT=<full hash> bash tools/long_385m.sh start", carry=[".carry-long-4"], timeout_s=300)
#   run(command="bash tools/long_385m.sh status", timeout_s=300)      # repeat until "all done"
# Each call returns after CALL_S (default 4 min): machines were kept between short calls but were gone after
# long ones (results/385m/NOTES.md). Pass the commit as a literal: the device's copy of .git may be stale.
# Here, after the last call (one folder per session):
#   mkdir -p runs/long385 && tar -xzf FILES_AT/long385.tar.gz -C runs/long385
#   PYTHONPATH=$PWD python tools/long_385m.py results --src runs/long385 [more sources] --extra machine=... device_commands=...
#   (issue 26: python tools/fair_385m.py results STAGE --src ...)
# TINY=1: tnl-tiny / transformer-tiny for a few steps on data/sample, eager, on the CPU; the whole chain
# (stage, start, stop, resume, status, results) runs in `bash tools/long_385m_tiny.sh` (~5 min, 2 cores).
set -uo pipefail
MODE=${1:?usage: $0 stage|prepare|start|status|stop}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LC_COLLATE=C   # C: file names sort in document order (02a < 02b < 03)
HERE=$(cd "$(dirname "$0")/.." && pwd)     # the repository (or, for the driver, the code snapshot)
export PYTHONPATH=$HERE
if [ "${TINY:-0}" = 1 ]; then
  ROOT=${LONG_ROOT:-/tmp/long385-tiny}; MODELS=${MODELS:-"tnl-tiny transformer-tiny"}; SEQ=${SEQ:-64}
  BATCH=${BATCH:-4}; TOKENS=${TOKENS:-6144}; EVAL_EVERY_TOKENS=${EVAL_EVERY_TOKENS:-1024}
  CKPT_EVERY_TOKENS=${CKPT_EVERY_TOKENS:-2048}; EVAL_TOKENS=${EVAL_TOKENS:-2048}; COMPILE=${COMPILE:-false}
  TOKENIZER=${TOKENIZER:-data/sample/tokenizer.json}
fi
ROOT=${LONG_ROOT:-${ROOT:-/tmp/long385}}     # everything the run writes on the machine
MODELS=${MODELS:-"tnl-385m transformer-385m"}
TOKENS=${TOKENS:-80000000}                  # per model; rounded up to whole steps
SEQ=${SEQ:-2048}
BATCH=${BATCH:-16}
LR=${LR:-6e-4}
EVAL_EVERY_TOKENS=${EVAL_EVERY_TOKENS:-5000000}
CKPT_EVERY_TOKENS=${CKPT_EVERY_TOKENS:-20000000}  # ~10 s per 4.6 GB checkpoint; resume needs the machine held
EVAL_TOKENS=${EVAL_TOKENS:-262144}           # per eval set, in-run evaluations only (the final ones score whole sets)
TRAIN_EVALS=${TRAIN_EVALS:-val,eval-heldout,eval-wikitext-valid,eval-wikitext-detok-valid}
COMPILE=${COMPILE:-true}
TOKENIZER=${TOKENIZER:-data/tokenizer-gutenberg-50272.json}
CARRY=${CARRY-$(ls -d "$HERE"/.carry-long-*/ 2>/dev/null)}   # carried data parts in this call's tree
T_CALL=$(date +%s)
CALL_S=${CALL_S:-240}                        # this call ends (packing included) after ~CALL_S s; keep calls short
WAIT=${WAIT:-$(( CALL_S - 40 ))}
STEP_TOKENS=$(( SEQ * BATCH ))
STEPS=$(( (TOKENS + STEP_TOKENS - 1) / STEP_TOKENS ))
EVAL_EVERY=$(( (EVAL_EVERY_TOKENS + STEP_TOKENS / 2) / STEP_TOKENS )); [ $EVAL_EVERY -ge 1 ] || EVAL_EVERY=1
CKPT_EVERY=$(( (CKPT_EVERY_TOKENS + STEP_TOKENS / 2) / STEP_TOKENS )); [ $CKPT_EVERY -ge 1 ] || CKPT_EVERY=1
mkdir -p "$ROOT/carry" "$ROOT/runs"
if [ -f "$ROOT/driver.env" ] && [ "$MODE" != start ]; then  # status/stop: the models that `start` began
  MODELS=$(sed -n "s/.*MODELS='\([^']*\)'.*/\1/p" "$ROOT/driver.env")
fi

stage() {  # carried parts -> $ROOT/carry, checked; prints what is there and what is still missing
  local d
  for d in $CARRY; do
    d=${d%/}
    [ -f "$d/SHA256SUMS" ] || { echo "$d: no SHA256SUMS (made by tools/long_385m_carry.py?)" >&2; return 2; }
    (cd "$d" && sha256sum --quiet -c SHA256SUMS) || { echo "$d: checksum mismatch" >&2; return 2; }
    cp "$d"/* "$ROOT/carry/" && echo "staged $(basename "$d"): $(cd "$d" && ls | grep -v SHA256SUMS | tr '\n' ' ')"
    touch "$ROOT/carry/.staged-$(basename "$d")"
  done
  local n have; n=$(cat "$ROOT/carry/NPARTS" 2>/dev/null || echo "?")
  have=$(ls -A "$ROOT/carry" | grep -c '^\.staged-')
  echo "data parts on this machine: $have of $n"
  [ "$have" = "$n" ]
}

all_staged() {  # stage, and say what to do when parts are still missing
  stage || { echo "not all data parts are here yet: carry the next .carry-long-K with 'stage'"; return 1; }
}

prepare_data() {  # tokenizes the staged parts into $ROOT/data once (start skips it when a `prepare` call did it)
  [ -f "$ROOT/data/meta.json" ] && return 0
  local t0 C=$ROOT/carry
  t0=$(date +%s)
  python3 -m tnlib prepare --corpus "$C"/corpus-*.txt.xz --out "$ROOT/data" --val-permille 10 \
    --tokenizer "$TOKENIZER" --eval heldout=$C/gutenberg-heldout.txt.xz wikitext-valid=$C/wikitext103-valid.txt.xz \
    wikitext-test=$C/wikitext103-test.txt.xz wikitext-detok-valid=wikitext-detok:$C/wikitext103-valid.txt.xz \
    wikitext-detok-test=wikitext-detok:$C/wikitext103-test.txt.xz > "$ROOT/prepare.log" 2>&1 || { tail -n 20 "$ROOT/prepare.log"; return 1; }
  echo "prepare: $(( $(date +%s) - t0 )) s"
}

running() { kill -0 "$(cat "$ROOT/driver.pid" 2>/dev/null)" 2>/dev/null; }

pack() {  # small files only: one tar.gz of metrics, logs and final evals/samples, plus the progress text
  local list=()
  cd "$ROOT" || return
  for m in $(ls runs); do  # every run this machine has made (several `start`s may share a lease)
    for f in metrics.jsonl train.log final.json final.log; do [ -f runs/$m/$f ] && list+=("runs/$m/$f"); done
  done
  for f in data-meta.json driver.log prepare.log; do [ -f $f ] && list+=("$f"); done
  [ ${#list[@]} -gt 0 ] && tar -czf "$OUT/long385.tar.gz" "${list[@]}" && ls -la "$OUT/long385.tar.gz"
  cd - >/dev/null
}

names() { local s; for s in $MODELS; do echo "${s%%=*}"; done; }  # run names of the specs
report() { python3 "$HERE/tools/long_385m.py" progress --root "$ROOT" --models $(names) 2>&1 | tee "$OUT/progress.txt"; }

follow() {  # progress every ~60 s (and at each new eval) until the driver ends or this call's time is used
  local until=$(( T_CALL + WAIT )) last=0
  while [ "$(date +%s)" -lt $until ]; do
    running || { echo "[$(( $(date +%s) - T_CALL )) s] driver not running"; break; }
    if [ $(( $(date +%s) - last )) -ge "${PRINT_S:-60}" ]; then
      echo "--- [$(( $(date +%s) - T_CALL )) s into this call]"; report; last=$(date +%s)
    fi
    sleep "${POLL_S:-10}"
  done
  echo "--- driver.log (tail)"; tail -n 6 "$ROOT/driver.log" 2>/dev/null
  report
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
  # the driver of the latest `start` (driver.log gathers every start of this lease): its last line decides
  if ! running && tail -n 1 "$ROOT/driver.log" 2>/dev/null | grep -q '^all done'; then echo "all done"; fi
}

drive() {  # the background process (run from the code snapshot): each model trained, then its final evals
  local ngpu i=0 pids=() m rc=0
  ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
  echo "driver $(date -u +%FT%TZ): $MODELS, $STEPS steps of $STEP_TOKENS tokens, eval every $EVAL_EVERY, $ngpu GPU(s)"
  one() {  # spec gpu: spec = NAME[=PRESET[:KEY=VALUE...]] (see RUNS above)
    local spec=$1 name rest preset d res=() sets=() mods=() steps=$STEPS kv p
    name=${spec%%=*}; rest=${spec#*=}; preset=${rest%%:*}
    IFS=: read -ra kv <<< "${rest#"$preset"}"
    for p in ${kv[@]+"${kv[@]}"}; do
      case $p in
        "") ;;
        m.*) mods+=("${p#m.}") ;;
        tokens=*) steps=$(( (${p#tokens=} + STEP_TOKENS - 1) / STEP_TOKENS )) ;;
        *) sets+=("$p") ;;
      esac
    done
    d=$ROOT/runs/$name
    mkdir -p "$d"
    [ -f "$d/final.json" ] && { echo "$name: done already"; return 0; }
    if [ ! -f "$d/final/model.safetensors" ]; then
      [ -f "$ROOT/STOP" ] && return 1
      [ -f "$d/checkpoint/state.pt" ] && res=(--resume)
      echo "$(date -u +%T) $name: train $preset ${res[*]} ${sets[*]} ${mods[*]} ($steps steps)"
      CUDA_VISIBLE_DEVICES=$2 python3 -m tnlib train --preset "$preset" --data "$ROOT/data" --out "$d" \
        ${res[@]+"${res[@]}"} --set seq_len=$SEQ batch_size=$BATCH lr=$LR max_steps=$steps \
        warmup_steps=$(( steps / 50 + 1 )) eval_every=$EVAL_EVERY eval_tokens=$EVAL_TOKENS ckpt_every=$CKPT_EVERY \
        compile=$COMPILE progress=false eval_sets=$TRAIN_EVALS ${sets[@]+"${sets[@]}"} \
        ${mods[@]+--model "${mods[@]}"} >> "$d/train.log" 2>&1 &
      echo $! > "$d/train.pid"
      wait $! || { echo "$(date -u +%T) $name: training failed (tail of train.log below)"; tail -n 15 "$d/train.log"; return 1; }
      [ -f "$d/final/model.safetensors" ] || { echo "$(date -u +%T) $name: stopped at its checkpoint"; return 1; }
    fi
    echo "$(date -u +%T) $name: final evals (whole sets)$([ "${SAMPLES:-0}" = 1 ] && echo " and samples")"
    CUDA_VISIBLE_DEVICES=$2 python3 tools/long_385m.py final --run "$d" --data "$ROOT/data" --tokenizer "$TOKENIZER" \
      --seq-len $SEQ --batch-size $BATCH --max-new-tokens $(( ${SAMPLES:-0} ? 80 : 0 )) > "$d/final.log" 2>&1 \
      || { echo "$name: final evals failed"; tail -n 15 "$d/final.log"; return 1; }
    rm -rf "$d/checkpoint" "$d/final"  # ~4.6 GB per run: only what travels back is kept
    echo "$(date -u +%T) $name: $(tail -n 1 "$d/final.log")"
  }
  for m in $MODELS; do
    if [ "$ngpu" -gt 1 ]; then one "$m" $(( i % ngpu )) & pids+=($!); else one "$m" 0 || rc=1; fi
    i=$(( i + 1 ))
  done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || rc=1; done
  [ $rc = 0 ] && echo "all done $(date -u +%FT%TZ)" || echo "driver ended with errors or stopped $(date -u +%FT%TZ)"
}

case "$MODE" in
stage)
  stage; exit 0 ;;
prepare)
  all_staged || exit 3
  prepare_data; exit ;;
start)
  if running; then echo "the driver is already running (pid $(cat "$ROOT/driver.pid")): following it"; follow; pack; exit 0; fi
  all_staged || exit 3
  prepare_data || exit 1
  cp "$ROOT/data/meta.json" "$ROOT/data-meta.json"
  python3 -c "import json; m = json.load(open('$ROOT/data/meta.json'))['splits']['train']['tokens']; \
print(f'training split: {m:,} tokens; each model trains on $(( STEPS * STEP_TOKENS )) (the same windows)'); \
assert m >= $(( STEPS * STEP_TOKENS )) or '${TINY:-0}' == '1', 'fewer distinct tokens than the budget'" || exit 1
  # the code the driver runs, apart from the working tree (a later call's copy of the tree may replace it)
  rm -rf "$ROOT/src" && mkdir -p "$(dirname "$ROOT/src/$TOKENIZER")" && cp -r "$HERE/tnlib" "$HERE/tools" "$ROOT/src/" \
    && cp "$HERE/$TOKENIZER" "$ROOT/src/$TOKENIZER" || exit 1
  rm -f "$ROOT/STOP"
  export TNLIB_COMMIT=${TNLIB_COMMIT:-$(git -C "$HERE" rev-parse HEAD 2>/dev/null || echo unknown)}
  ENV="TINY=${TINY:-0} LONG_ROOT=$ROOT MODELS='$MODELS' TOKENS=$TOKENS SEQ=$SEQ BATCH=$BATCH LR=$LR \
EVAL_EVERY_TOKENS=$EVAL_EVERY_TOKENS CKPT_EVERY_TOKENS=$CKPT_EVERY_TOKENS EVAL_TOKENS=$EVAL_TOKENS COMPILE=$COMPILE \
TOKENIZER=$TOKENIZER TNLIB_COMMIT=$TNLIB_COMMIT TRAIN_EVALS=$TRAIN_EVALS SAMPLES=${SAMPLES:-0}"
  echo "$ENV" > "$ROOT/driver.env"
  echo "starting the driver: $STEPS steps x $STEP_TOKENS tokens per model ($MODELS), commit $TNLIB_COMMIT"
  setsid nohup bash -c "echo \$\$ > '$ROOT/driver.pid'; cd '$ROOT/src' && exec env $ENV bash tools/long_385m.sh _drive" \
    >> "$ROOT/driver.log" 2>&1 < /dev/null &
  sleep 3
  follow; pack ;;
status)
  [ -f "$ROOT/driver.log" ] || { echo "no run on this machine (given back?): 'stage' the data parts again, then 'start'"; exit 2; }
  follow; pack ;;
stop)
  touch "$ROOT/STOP"
  for m in $(names); do
    p=$(cat "$ROOT/runs/$m/train.pid" 2>/dev/null) && kill -0 "$p" 2>/dev/null && kill -TERM "$p" && echo "SIGTERM to $m ($p)"
  done
  for _ in $(seq 1 60); do running || break; sleep 2; done
  running && echo "the driver still runs" || echo "stopped; 'start' resumes from the checkpoints"
  pack ;;
_drive)
  drive ;;
*)
  echo "usage: $0 stage|prepare|start|status|stop" >&2; exit 2 ;;
esac
