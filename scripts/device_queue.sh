#!/usr/bin/env bash
# One nvidia-h200 call (2026-11-30, the session's last device minutes): the forward's work-queue launch
# (tnlib.ops.lightning._QUEUE_STATE, off by default) against the default plan at 16K/32K
# (scripts/bench_queue.py, every variant checked against the default first), then the kernel benchmark
# at H=16 D=128 for tnlib and fla in the same run, with the fastest queue variant switched on when it
# beats the default forward at 32K by more than 2% (else the default: a repeat of the figures of record).
# Usage: run(command="TNLIB_COMMIT=<hash> bash scripts/device_queue.sh", kind="nvidia-h200", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl > /dev/null 2>&1 || echo "fla wheel: not installed"
timeout 120 python3 scripts/bench_queue.py --out "$OUT" --best-out "$OUT/best.txt" --shapes 16:128:128,32:64:64 \
  --leads 1,3 > "$OUT/queue.log" 2>&1
echo "bench_queue rc $?"
BEST=$(cat "$OUT/best.txt" 2>/dev/null)
echo "best: ${BEST:-default}"
timeout 150 python3 scripts/bench_kernels.py --impls tnlib,fla --shapes 16:128:128 --no-long-check --out "$OUT" \
  ${BEST:+--set $BEST} > "$OUT/kernels.log" 2>&1
echo "bench_kernels rc $?"
python3 - "$OUT" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/queue-h200.json"))
for r in d["rows"]:
    print(r["T"], r["H"], r["variant"], r.get("target_ctas"), r.get("lead"), r.get("programs_per_sm"), r.get("fwd_ms"),
          r.get("fwdbwd_ms"), r.get("error", ""), max(r.get("rel_err_vs_default", {"-": 0}).values()))
PY
grep -E "^(tnlib|fla) " "$OUT/kernels.log"
