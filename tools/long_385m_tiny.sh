#!/usr/bin/env bash
# The whole chain of tools/long_385m.sh on the CPU with TINY=1 (tnl-tiny / transformer-tiny on data/sample,
# eager), in a temporary folder: carry parts -> stage -> prepare -> start -> stop (checkpoint) -> start (resume) ->
# status until done -> unpack -> tools/long_385m.py results. About a minute on 2 cores; not in `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-$(mktemp -d /tmp/long385-tiny.XXXXXX)}
mkdir -p "$T"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD TINY=1 LONG_ROOT=$T/root POLL_S=1 PRINT_S=5 SAMPLES=1
# a run spec with overrides beside the two plain presets: model field (m.), training field, its own token count
export MODELS="tnl-tiny transformer-tiny tnl-fp32=tnl-tiny:m.residual_dtype=params:seed=7:tokens=20480"
PY=${PYTHON:-python3}
cp data/sample/wikitext103-valid-sample.txt "$T/wikitext103-valid.txt"
cp data/sample/wikitext103-valid-sample.txt "$T/wikitext103-test.txt"   # the sample has no test split
cp data/sample/gutenberg-sample.txt.xz "$T/corpus-gutenberg-sample.txt.xz"
$PY tools/long_385m_carry.py --shards "$T/corpus-gutenberg-sample.txt.xz" --heldout data/sample/heldout-sample.txt.xz \
  --wikitext "$T/wikitext103-valid.txt" "$T/wikitext103-test.txt" --parts 2 --max-bytes 420000 --out "$T/.carry-long"
export PATH=$(cd "$(dirname "$(command -v $PY)")" && pwd):$PATH  # the venv's python3 first (absolute: the driver cds)
echo "=== start without all parts (expect exit 3)"
rc=0; CARRY=$T/.carry-long-1 OUT=$T/out0 bash tools/long_385m.sh start || rc=$?
[ $rc = 3 ] || { echo "expected exit 3, got $rc"; exit 1; }
echo "=== prepare with the last part (tokenizes; no driver yet)"
CARRY=$T/.carry-long-2 OUT=$T/outp bash tools/long_385m.sh prepare
[ -f "$T/root/data/meta.json" ] || { echo "prepare wrote no data"; exit 1; }
echo "=== start; the call returns while the driver runs"
CARRY=$T/.carry-long-2 OUT=$T/out1 TOKENS=${TINY_TOKENS:-102400} WAIT=${TINY_WAIT:-12} bash tools/long_385m.sh start
echo "=== stop (SIGTERM: checkpoint)"
CARRY= OUT=$T/out2 TOKENS=${TINY_TOKENS:-102400} bash tools/long_385m.sh stop
echo "=== start again: resumes"
CARRY= OUT=$T/out3 TOKENS=${TINY_TOKENS:-102400} WAIT=600 bash tools/long_385m.sh start
grep -q '^all done' "$T/root/driver.log" || { echo "not done"; exit 1; }
echo "=== status after the end"
CARRY= OUT=$T/out4 TOKENS=${TINY_TOKENS:-102400} WAIT=5 bash tools/long_385m.sh status
mkdir -p "$T/back" && tar -xzf "$T/out4/long385.tar.gz" -C "$T/back"
$PY tools/long_385m.py results --src "$T/back" --out-root "$T/results" --models tnl=tnl-tiny transformer=transformer-tiny \
  --extra machine=cpu-tiny-test
$PY - "$T" <<'PY'
import json, sys, glob
T = sys.argv[1]
for m in ("tnl-tiny", "transformer-tiny"):
    recs = [json.loads(l) for l in open(f"{T}/back/runs/{m}/metrics.jsonl")]
    steps = [r["step"] for r in recs if "tokens_per_s" in r]
    assert steps == list(range(1, len(steps) + 1)), f"{m}: steps not continuous after the resume"
    fin = json.load(open(f"{T}/back/runs/{m}/final.json"))
    assert set(fin["evals"]) == {"val", "eval-heldout", "eval-wikitext-valid", "eval-wikitext-test",
                                 "eval-wikitext-detok-valid", "eval-wikitext-detok-test"}, sorted(fin["evals"])
    assert all(e["tokens"] == e["set_tokens"] for e in fin["evals"].values()), "final evals are not whole-set"
    assert len(fin["samples"]) == 4
start = json.loads(open(f"{T}/back/runs/tnl-fp32/metrics.jsonl").readline())
assert start["model"]["residual_dtype"] == "params" and start["config"]["seed"] == 7, "run spec not applied"
assert start["config"]["max_steps"] == 80, start["config"]["max_steps"]  # 20480 tokens of 4 x 64
logs = "".join(open(f"{T}/back/runs/{m}/train.log").read() for m in ("tnl-tiny", "transformer-tiny"))
assert '"interrupted": "SIGTERM"' in logs, "no model was stopped by the SIGTERM"
out = glob.glob(f"{T}/results/385m-*")[0]
s = json.load(open(f"{out}/summary.json"))
print(out, sorted(s["ppl_ratios"]), {k: round(v, 3) for k, v in s["ppl_ratios"].items()})
print("TINY chain OK")
PY
