#!/usr/bin/env bash
# Train a few rows of the ablation sweep (e.g. issue 26's E/no-gate-matched) on a lent GPU machine that
# already holds the data parts of tools/long_385m.sh (staged in the same lease): the sweep's data is shards
# 00-02 of the corpus, which are parts 1-2 of that carry (00, 01a, 01b, 02: the same documents in the same
# order), so nothing more has to travel. The prepared data is checked against results/ablation/data-meta.json
# (the same token counts per split) before any training.
#
#   start   prepares the sweep's data (once), starts `python -m tnlib sweep` on ONLY in the background
#           (setsid nohup: it outlives the call) and follows it until the call's time is used
#   status  follows it again; packs $OUT/ablation-rows.tar.gz (the finished runs, relative to results/ablation/)
#
#   run(command="ONLY=E/no-gate-matched TNLIB_COMMIT=<full hash> bash tools/ablation_rows.sh start", timeout_s=300)
#   run(command="bash tools/ablation_rows.sh status", timeout_s=300)        # until it prints "rows done"
# Here: tar -xzf FILES_AT/ablation-rows.tar.gz -C results/ablation
#       python -m tnlib sweep configs/ablations.toml --summarize --shape d_model=384 n_layers=6 n_heads=6 --set tokens=20004864
#
# SPEC=configs/other.toml trains that spec's rows instead (same data, shape and tokens), its results and work in
# $ROOT/results-other and $ROOT/work-other (apart from the ablation sweep's: both have a default/default row),
# packed into $OUT/other-rows.tar.gz; e.g. issue 29's document masking (results/document-mask/NOTES.md):
#   run(command="SPEC=configs/document-mask.toml ONLY='default M' TNLIB_COMMIT=<full hash> bash tools/ablation_rows.sh start")
set -uo pipefail
MODE=${1:?usage: $0 start|status}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LC_COLLATE=C
CARRY=${LONG_ROOT:-/tmp/long385}/carry       # where tools/long_385m.sh staged the parts
ROOT=${ABL_ROOT:-/tmp/abl-rows}
ONLY=${ONLY:-E/no-gate-matched}
SPEC=${SPEC:-configs/ablations.toml}
NAME=$(basename "$SPEC" .toml)
SUFFIX=$([ "$NAME" = ablations ] || echo "-$NAME")   # the ablation sweep keeps its folders' names
PACK=$([ "$NAME" = ablations ] && echo ablation-rows || echo "$NAME-rows")
PARALLEL=${PARALLEL:-2}
SHAPE=${SHAPE:-"d_model=384 n_layers=6 n_heads=6"}   # what the committed sweep ran (results/ablation/summary.json)
TOKENS=${TOKENS:-20004864}
T_CALL=$(date +%s)
CALL_S=${CALL_S:-240}
mkdir -p "$ROOT"
running() { kill -0 "$(cat "$ROOT/sweep$SUFFIX.pid" 2>/dev/null)" 2>/dev/null; }

prepare() {
  [ -f "$ROOT/data/meta.json" ] && return 0
  local files=("$CARRY"/corpus-gutenberg-00.txt.xz "$CARRY"/corpus-gutenberg-01*.txt.xz "$CARRY"/corpus-gutenberg-02.txt.xz)
  for f in "${files[@]}" "$CARRY/gutenberg-heldout.txt.xz"; do
    [ -f "$f" ] || { echo "$f is missing: stage parts 1-2 with tools/long_385m.sh first"; return 1; }
  done
  python3 -m tnlib prepare --corpus "${files[@]}" --out "$ROOT/data" --val-permille 10 \
    --tokenizer data/tokenizer-gutenberg-50272.json --eval heldout="$CARRY/gutenberg-heldout.txt.xz" \
    > "$ROOT/prepare.log" 2>&1 || { tail -n 20 "$ROOT/prepare.log"; return 1; }
  python3 - "$ROOT/data/meta.json" <<'PY' || { rm -rf "$ROOT/data"; return 1; }
import json, sys
have = {k: v["tokens"] for k, v in json.load(open(sys.argv[1]))["splits"].items()}
want = {k: v["tokens"] for k, v in json.load(open("results/ablation/data-meta.json"))["splits"].items()}
assert have == want, f"not the sweep's data: {have} vs {want}"
print("data: the sweep's token counts", have)
PY
}

follow() {
  local until=$(( T_CALL + CALL_S - 30 ))
  while [ "$(date +%s)" -lt $until ] && running; do sleep 10; done
  tail -n 5 "$ROOT/sweep$SUFFIX.log"
  (cd "$ROOT/results$SUFFIX" 2>/dev/null && tar -czf "$OUT/$PACK.tar.gz" $(ls -d */*/seed*/ 2>/dev/null) && ls -la "$OUT")
  running || { grep -q "runs finished" "$ROOT/sweep$SUFFIX.log" && echo "rows done"; }
}

case "$MODE" in
start)
  running && { echo "already running"; follow; exit 0; }
  prepare || exit 1
  export TNLIB_COMMIT=${TNLIB_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
  setsid nohup bash -c "echo \$\$ > '$ROOT/sweep$SUFFIX.pid'; exec python3 -m tnlib sweep $SPEC \
    --data '$ROOT/data' --results '$ROOT/results$SUFFIX' --work '$ROOT/work$SUFFIX' --parallel $PARALLEL --only $ONLY \
    --shape $SHAPE --set tokens=$TOKENS" >> "$ROOT/sweep$SUFFIX.log" 2>&1 < /dev/null &
  sleep 5
  follow ;;
status)
  follow ;;
*)
  echo "usage: $0 start|status" >&2; exit 2 ;;
esac
