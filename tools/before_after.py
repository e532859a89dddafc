"""Before/after a kernel-interface change on one GPU, in one call: tnlib of commit BEFORE against this tree.

Issue 27 item 2 changed how the Lightning kernels take their arguments, not what they compute; this checks
on a GPU that speed did not move. Each tree is timed by ``tools/compare_commits.py`` (imported from the
tree under test through ``PYTHONPATH``) in its own process:

* kernels: ``lightning_attention`` forward and forward+backward (``triton.testing.do_bench`` medians), bf16,
  H=8 K=256 V=128 (the LRPE layer) and H=16 K=V=128, B*T = 65,536 at T = 2,048 and 32,768 (segments), after
  a correctness gate against the float32 chunked reference;
* train: tnl-385m training tokens/s at T = 2,048 (32,768 tokens per step) through ``TrainConfig``'s defaults
  (eager: ``compile`` is off by default), 5 warm-up steps, 20 timed.

First both trees run the kernels part once side by side, untimed, so that Triton compiles both trees'
attention kernels at once (a cold cache otherwise costs most of the call; the training part is left out
there: two trainings at once would not fit an 80 GB GPU, and its warm-up steps compile what it needs).
Then the timed runs alternate before, after, before, after: the first pair always, another while
``--budget`` seconds allow it (a run still going at ``--budget`` + 60 s is stopped, keeping what it wrote). Writes ``<out>/before-after-<gpu>.json``: every row of every
timed run (``label``, ``round``), each run's provenance, and per figure the after/before ratio of the
medians over rounds, with ``within`` (the largest deviation allowed, 2%) and ``all_within``.

    git archive dae57b6 tnlib | (mkdir -p /tmp/before && tar -x -C /tmp/before)   # or let the script do it
    PYTHONPATH=$PWD python3 tools/before_after.py --before-commit dae57b6 --before /tmp/before --out $OUT
    PYTHONPATH=$PWD python3 tools/before_after.py --before-commit dae57b6 --out /tmp/x --device cpu  # script check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "tools", "compare_commits.py")
GPU_ARGS = ["--parts", "kernels,train", "--shapes", "8:256:128,16:128:128", "--lens", "2048,32768",
            "--tokens", "65536", "--train-lens", "2048", "--train-tokens", "32768", "--train-steps", "20",
            "--train-warmup", "5", "--no-compile"]
CPU_ARGS = ["--parts", "kernels,train", "--device", "cpu", "--shapes", "2:32:16", "--lens", "64,128", "--tokens",
            "256", "--train-lens", "32", "--train-tokens", "64", "--train-steps", "2", "--train-warmup", "1",
            "--no-compile", "--preset", "tnl-tiny", "--vocab", "256"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def before_tree(args, tmp):
    """``(PYTHONPATH of the before tree, how it was obtained)``."""
    if args.before:
        if not os.path.isfile(os.path.join(args.before, "tnlib", "ops", "lightning", "kernels.py")):
            sys.exit(f"--before {args.before}: no tnlib/ there")
        return os.path.abspath(args.before), f"--before {args.before}"
    dest = os.path.join(tmp, "before")
    os.makedirs(dest)
    r = subprocess.run(f"git -C {ROOT} archive {args.before_commit} tnlib | tar -x -C {dest}", shell=True,
                       capture_output=True, text=True)
    if r.returncode or not os.path.isdir(os.path.join(dest, "tnlib")):
        sys.exit(f"git archive {args.before_commit} failed here ({r.stderr.strip()[:200]}): extract it where git "
                 "history is and pass --before DIR")
    return dest, f"git archive {args.before_commit}"


def env_for(pythonpath, commit):
    """A child's environment: its tree first on the path, its commit recorded, and nothing of Triton's fp-fusion
    setting inherited (the before tree sets it at import, the after tree requests it per launch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    env.update(PYTHONPATH=pythonpath, TNLIB_COMMIT=commit)
    return env


def start(label, pythonpath, commit, out, extra, warm=False):
    args = list(CPU_ARGS if extra.device == "cpu" else GPU_ARGS)
    if warm:  # compile the attention kernels the timed run will launch; its timings are not kept
        args[args.index("--parts") + 1] = "kernels"
    cmd = [sys.executable, COMPARE, "--label", label, "--out", out] + args
    return subprocess.Popen(cmd, env=env_for(pythonpath, commit), cwd=pythonpath, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(p, label, timeout):
    try:
        out, _ = p.communicate(timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        log(f"{label}: stopped at the time budget")
    for line in out.splitlines()[-12:]:
        print(f"    {label}| {line}", flush=True)
    return p.returncode


def key(r):
    if r.get("part") == "kernels" and "fwd_ms" in r:
        return f"kernels H={r['H']} K={r['K']} V={r['V']} T={r['T']} B={r['B']}"
    if r.get("part") == "train" and "tokens_per_s" in r:
        return f"train {r['preset']} T={r['T']} B={r['B']}"
    return None


def summarize(rows, within):
    """Per figure: medians over rounds, before and after, and after/before."""
    vals = {}
    for r in rows:
        k = key(r)
        if k is None:
            continue
        for field in (("fwd_ms", "fwdbwd_ms") if r["part"] == "kernels" else ("tokens_per_s",)):
            vals.setdefault((k, field), {}).setdefault(r["label"], []).append(r[field])
    out = []
    for (k, field), by in sorted(vals.items()):
        if "before" in by and "after" in by:
            b, a = statistics.median(by["before"]), statistics.median(by["after"])
            out.append(dict(figure=k, field=field, before=b, after=a, ratio=round(a / b, 4),
                            within=abs(a / b - 1) <= within, before_runs=by["before"], after_runs=by["after"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-commit", required=True, help="the commit of the before tree (recorded)")
    ap.add_argument("--before", default=None, help="a folder holding that commit's tnlib/ (else git archive)")
    ap.add_argument("--after-commit", default=None, help="recorded for this tree (default: git rev-parse HEAD)")
    ap.add_argument("--out", required=True, help="folder for before-after-<gpu>.json")
    ap.add_argument("--budget", type=float, default=200,
                    help="seconds after which no new pair of timed runs starts (default 200; runs are stopped at +60)")
    ap.add_argument("--within", type=float, default=0.02, help="largest after/before deviation allowed")
    ap.add_argument("--device", default="cuda", help="cpu: check the script at tiny sizes (times mean nothing)")
    a = ap.parse_args()
    t0 = time.time()
    from tnlib.provenance import gpu_slug, write_results

    after_commit = a.after_commit or subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                                    text=True).stdout.strip() or "unknown"
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"before-after-{gpu_slug() if a.device == 'cuda' else 'cpu'}.json")
    with tempfile.TemporaryDirectory() as tmp:
        before, how = before_tree(a, tmp)
        trees = {"before": (before, a.before_commit), "after": (ROOT, after_commit)}
        log(f"before: {how}; after: {ROOT} ({after_commit}); warm-up: both trees side by side, untimed")
        warm = {lb: start(lb, pp, c, os.path.join(tmp, f"warm-{lb}.json"), a, warm=True) for lb, (pp, c) in trees.items()}
        hard = a.budget + 60
        for lb, p in warm.items():
            finish(p, f"warm-up {lb}", hard - (time.time() - t0))
        rows, headers, took = [], [], {}
        for rnd in range(1, 100):
            for lb in ("before", "after"):
                # the first pair always; another pair only where both of its runs fit the budget
                if rnd > 1 and lb == "before" and time.time() - t0 + 1.1 * (took["before"] + took["after"]) > a.budget:
                    break
                log(f"round {rnd}: {lb}")
                t = time.time()
                out = os.path.join(tmp, f"{lb}-{rnd}.json")
                finish(start(lb, *trees[lb], out, a), lb, hard - (time.time() - t0))
                took[lb] = time.time() - t
                if os.path.isfile(out):
                    doc = json.load(open(out))
                    headers.append(dict(doc["header"], round=rnd))
                    rows += [dict(r, round=rnd) for r in doc["rows"]]
                summary = summarize(rows, a.within)
                write_results(path, rows, dict(what="issue 27 item 2: kernel interfaces, before/after on one GPU",
                                               before=a.before_commit, before_source=how, after=after_commit,
                                               runs=headers, summary=summary, within=a.within,
                                               all_within=bool(summary) and all(s["within"] for s in summary)))
            else:
                continue
            break
    summary = summarize(rows, a.within)
    for s in summary:
        print(f"{s['figure']:40s} {s['field']:12s} before {s['before']:12.4f} after {s['after']:12.4f} "
              f"x{s['ratio']:.4f} {'ok' if s['within'] else 'OUTSIDE'}")
    log(f"{len({h['round'] for h in headers})} rounds in {time.time() - t0:.0f} s: {path}")


if __name__ == "__main__":
    main()
