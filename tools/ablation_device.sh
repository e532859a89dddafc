#!/usr/bin/env bash
# The ablation sweep (issue 15) on a lent GPU machine (no internet, no `datasets`), over chained calls.
#
#   start   prepares the data from the carried shards, sizes the study (tools/ablation_size.py:
#           tokens/s of candidate shapes, the largest shape and token budget whose sweep fits BUDGET_MIN),
#           starts the sweep in the background (setsid nohup: it outlives the call), then follows it
#           like `status` until the call's own time is nearly used.
#   status  follows the running sweep for up to WAIT seconds (returns early when it ends), then packs
#           what is finished into $OUT. Run it in chained calls until the log says "sweep: N/N".
#
# Here, before the first call (the machine cannot see ../shared; the tree it gets may carry 64 MiB):
#   mkdir -p .carry-abl && cp ../shared/data/corpus-gutenberg-0[0-2].txt.xz ../shared/data/gutenberg-heldout.txt.xz .carry-abl/
#   grep -qx '/.carry-abl/' .git/info/exclude || echo /.carry-abl/ >> .git/info/exclude
# (43.7 MB: ~36M training tokens with the 50,272-token BPE, so no run repeats data up to that budget.)
# Then, on nvidia-h200:
#   run(command="TNLIB_COMMIT=$(git rev-parse HEAD) bash tools/ablation_device.sh start", carry=[".carry-abl"], timeout_s=600)
#   run(command="SPEED=1 bash tools/ablation_device.sh status", timeout_s=600)   # repeat until done
# SPEED=1: when the sweep has ended, the same call times every row at 385M (tools/ablation_speed.py,
# ~2-3 min) and returns $OUT/speed-385m-h200.json (copy it to results/ablation/ before --summarize).
# Each call returns $OUT/ablation-results.tar.gz (finished runs + summaries, relative to results/ablation/),
# $OUT/sweep.log and $OUT/sizing.json. Unpack here with
#   tar -xzf FILES_AT/ablation-results.tar.gz -C results/ablation && cp FILES_AT/sizing.json results/ablation/
#   python -m tnlib sweep configs/ablations.toml --summarize
set -uo pipefail
MODE=${1:?usage: $0 start|status}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ROOT=${ABL_ROOT:-/tmp/abl}              # everything the sweep writes on the device
DATA=$ROOT/data
SPEC=${SPEC:-configs/ablations.toml}
BUDGET_MIN=${BUDGET_MIN:-11}            # wall minutes for the sweep itself (the sizing comes on top)
PARALLEL=${PARALLEL:-8}                 # training processes sharing the GPU
CANDIDATES=${CANDIDATES:-256x6,384x6,512x8,768x8}
SIZE_SECONDS=${SIZE_SECONDS:-15}
MIN_TOKENS=${MIN_TOKENS:-20000000}     # per run (issue 15: at least 20M)
T_CALL=$(date +%s)
CALL_S=${CALL_S:-570}                   # this call ends (packing included) before the tool's 600 s
WAIT=${WAIT:-$(( CALL_S - 30 ))}
mkdir -p $ROOT

pack() {  # finished runs and summaries -> one small tar.gz; plus the log and the sizing
  if [ -d $ROOT/results ]; then
    tar -czf "$OUT/ablation-results.tar.gz" -C $ROOT/results . && ls -la "$OUT/ablation-results.tar.gz"
  fi
  cp $ROOT/sweep.log "$OUT/sweep.log" 2>/dev/null || true
  cp $ROOT/sizing.json "$OUT/sizing.json" 2>/dev/null || true
  cp $ROOT/size.log "$OUT/size.log" 2>/dev/null || true
}

follow() {  # print progress until the sweep ends or the call's time is used
  local until=$(( T_CALL + WAIT )) last=""
  while [ "$(date +%s)" -lt $until ]; do
    if ! kill -0 "$(cat $ROOT/sweep.pid 2>/dev/null)" 2>/dev/null; then
      echo "sweep process not running ($(( $(date +%s) - T_CALL )) s into this call)"; break
    fi
    local now; now=$(grep -c '^done' $ROOT/sweep.log 2>/dev/null)
    if [ "$now" != "$last" ]; then
      echo "[$(( $(date +%s) - T_CALL )) s] $(grep '^done' $ROOT/sweep.log | tail -n 1)"; last=$now
    fi
    sleep 10
  done
  echo "--- sweep.log (tail)"; tail -n 8 $ROOT/sweep.log
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
}

speed() {  # SPEED=1: once the sweep has ended, time every row at 385M (tools/ablation_speed.py) in this call
  [ "${SPEED:-0}" = 1 ] || return 0
  if kill -0 "$(cat $ROOT/sweep.pid 2>/dev/null)" 2>/dev/null; then echo "speed: the sweep still runs; later"; return 0; fi
  if [ ! -f $ROOT/speed-385m-h200.json ] && [ $(( $(date +%s) - T_CALL )) -gt $(( 600 - ${SPEED_S:-240} )) ]; then
    echo "speed: too little of this call left; run 'SPEED=1 ... status' again"; return 0
  fi
  [ -f $ROOT/speed-385m-h200.json ] || python3 tools/ablation_speed.py --spec $SPEC --out $ROOT/speed-385m-h200.json \
    2>&1 | tee $ROOT/speed.log
  cp $ROOT/speed-385m-h200.json $ROOT/speed.log "$OUT/" 2>/dev/null || true
}

case "$MODE" in
start)
  if [ -f $ROOT/sweep.pid ] && kill -0 "$(cat $ROOT/sweep.pid)" 2>/dev/null; then
    echo "a sweep is already running (pid $(cat $ROOT/sweep.pid)): following it"; follow; pack; exit 0
  fi
  if [ ! -f $DATA/meta.json ]; then
    ls .carry-abl/corpus-gutenberg-*.txt.xz >/dev/null || { echo "no .carry-abl/ shards: see the header" >&2; exit 2; }
    t0=$(date +%s)
    python3 -m tnlib prepare --corpus .carry-abl/corpus-gutenberg-*.txt.xz --out $DATA --val-permille 10 \
      --tokenizer data/tokenizer-gutenberg-50272.json --eval heldout=.carry-abl/gutenberg-heldout.txt.xz \
      > $ROOT/prepare.log 2>&1 || { cat $ROOT/prepare.log; exit 1; }
    echo "prepare: $(( $(date +%s) - t0 )) s"; grep -A2 '"train"' $ROOT/prepare.log | head -n 3
  fi
  cp $DATA/meta.json "$OUT/data-meta.json"
  # runs finished on an earlier machine (unpacked into results/ablation/ here, so carried as untracked files)
  if ls results/ablation/*/*/seed*/final.json >/dev/null 2>&1 && [ ! -d $ROOT/results ]; then
    mkdir -p $ROOT/results && cp -r results/ablation/. $ROOT/results/
    echo "seeded with $(ls results/ablation/*/*/seed*/final.json | wc -l) finished runs from results/ablation/"
  fi
  t0=$(date +%s)
  if [ -z "${SWEEP_ARGS:-}" ]; then  # SWEEP_ARGS="--shape ... --set tokens=..." skips the sizing
    python3 tools/ablation_size.py --spec $SPEC --data $DATA --candidates $CANDIDATES --parallel $PARALLEL \
      --seconds $SIZE_SECONDS --budget-min $BUDGET_MIN --min-tokens $MIN_TOKENS --work $ROOT/size --out $ROOT/sizing.json 2>&1 | tee $ROOT/size.log
    SWEEP_ARGS=$(grep '^SWEEP_ARGS' $ROOT/size.log | tail -n 1 | cut -d' ' -f2-)
    [ -n "$SWEEP_ARGS" ] || { echo "sizing failed"; pack; exit 1; }
    echo "sizing: $(( $(date +%s) - t0 )) s"
  fi
  echo "starting: python3 -m tnlib sweep $SPEC --parallel $PARALLEL $SWEEP_ARGS"
  # its own session, so it outlives this call; the pid file names the sweep process itself (exec)
  setsid nohup bash -c "echo \$\$ > $ROOT/sweep.pid; exec python3 -m tnlib sweep $SPEC --data $DATA \
    --results $ROOT/results --work $ROOT/work --parallel $PARALLEL $SWEEP_ARGS" > $ROOT/sweep.log 2>&1 < /dev/null &
  sleep 5
  follow; pack; speed ;;
status)
  [ -f $ROOT/sweep.log ] || { echo "no sweep on this machine (it was given back?): run 'start' again"; exit 2; }
  follow; pack; speed ;;
*)
  echo "usage: $0 start|status" >&2; exit 2 ;;
esac
