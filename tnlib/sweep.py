"""Ablation sweep: many small training runs from one spec file, resumable, summarised per table.

Run as ``python -m tnlib sweep configs/ablations.toml --data DIR`` (``make ablations``); taught in
``notebooks/10_ablations.ipynb``. The spec (TOML) holds a ``[recipe]`` shared by every run, a ``[shape]``
applied to every model, and ``[[row]]`` entries (table, name, arch, model overrides, seeds; ``train``: the
row's own ``TrainConfig`` settings, e.g. ``{ document_mask = true }``, over the recipe's). Every run
reads the same batches in the same order (``recipe.data_seed``); a row's seeds change only the
initialisation. Each run is one ``python -m tnlib train`` process, so ``parallel`` of them can share a GPU.

Layout: ``work/<table>/<name>/seed<k>/`` holds the checkpoint of a run in progress; a finished run is
copied to ``results/<table>/<name>/seed<k>/`` (``config.json``, ``metrics.jsonl``, ``final.json``) and is
skipped from then on. An interrupted run (SIGINT/SIGTERM: the sweep forwards it, the run checkpoints)
resumes from its checkpoint; one without a checkpoint restarts from scratch.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["load_spec", "plan_runs", "run_sweep", "summarize", "row_model_overrides", "Run", "verdict",
           "VERDICT_RULE", "LEVEL_MARGIN"]

_RECIPE_KEYS = {"size", "seq_len", "batch_size", "grad_accum", "tokens", "lr", "min_lr_ratio", "warmup_frac",
                "weight_decay", "grad_clip", "evals", "eval_tokens", "eval_sets", "data_seed", "compile", "dtype",
                "ckpts"}
_ROW_KEYS = {"table", "name", "arch", "overrides", "seeds", "paper_ppl", "match_params", "train"}

#: the paper's relative difference below which it reports no material difference between two rows
LEVEL_MARGIN = 0.005
VERDICT_RULE = (
    "d = (mean ppl of the row - mean ppl of the default) / mean ppl of the default, over seeds; s = the larger "
    "relative sample standard deviation (n-1) of the two rows' seeds. Where the paper reports a direction "
    "(|paper d| > 0.5%): 'reproduced' if d has its sign and |d| > 2s, 'not reproduced' if the opposite sign and "
    "|d| > 2s, else 'inconclusive'. Where the paper reports no material difference (|paper d| <= 0.5%): "
    "'reproduced' if |d| <= 0.5%, 'not reproduced' if |d| > max(0.5%, 2s), else 'inconclusive'. Rows the paper "
    "does not have: 'better'/'worse' beyond 2s, else 'level within 2s'.")


def verdict(paper_delta: float | None, delta: float, spread: float) -> str:
    """``VERDICT_RULE`` on relative differences: ``paper_delta`` (None: not in the paper) and ``delta`` are
    (row - default) / default, ``spread`` the larger relative seed standard deviation of the two rows."""
    if paper_delta is None:
        return ("worse" if delta > 0 else "better") if abs(delta) > 2 * spread else "level within 2s"
    if abs(paper_delta) <= LEVEL_MARGIN:  # the paper: no material difference
        if abs(delta) <= LEVEL_MARGIN:
            return "reproduced"
        return "not reproduced" if abs(delta) > max(LEVEL_MARGIN, 2 * spread) else "inconclusive"
    if abs(delta) <= 2 * spread:
        return "inconclusive"
    return "reproduced" if (delta > 0) == (paper_delta > 0) else "not reproduced"
_RECIPE_DEFAULTS = {"size": "tiny", "grad_accum": 1, "min_lr_ratio": 0.1, "warmup_frac": 0.02, "weight_decay": 0.1,
                    "grad_clip": 1.0, "evals": 4, "eval_sets": ["val"], "data_seed": 0, "compile": False,
                    "dtype": "auto", "ckpts": 4}


def _parse_value(v):
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def load_spec(path: str, shape: dict | None = None, recipe: dict | None = None) -> dict:
    """Read and check a sweep spec; ``shape`` / ``recipe`` override its tables (e.g. from the command line).
    Every row's model config is built (without weights) here, so a bad override fails before any run."""
    import tomllib

    from .models import get_config

    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep spec {path} not found")
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    rec = {**_RECIPE_DEFAULTS, **spec.get("recipe", {}), **(recipe or {})}
    bad = set(rec) - _RECIPE_KEYS
    if bad:
        raise ValueError(f"{path}: unknown recipe keys {sorted(bad)}; known: {sorted(_RECIPE_KEYS)}")
    for key in ("seq_len", "batch_size", "tokens", "lr"):
        if key not in rec:
            raise ValueError(f"{path}: recipe.{key} is required")
    if isinstance(rec["eval_sets"], str):
        rec["eval_sets"] = rec["eval_sets"].split(",")
    shp = {**spec.get("shape", {}), **(shape or {})}
    rows = spec.get("row", [])
    if not rows:
        raise ValueError(f"{path}: no [[row]] entries")
    seen = set()
    for row in rows:
        missing = {"table", "name", "arch", "seeds"} - set(row)
        extra = set(row) - _ROW_KEYS
        if missing or extra:
            raise ValueError(f"{path}: row {row.get('name')!r}: missing {sorted(missing)}, unknown {sorted(extra)}")
        row.setdefault("overrides", {})
        key = (row["table"], row["name"])
        if key in seen:
            raise ValueError(f"{path}: row {key} appears twice")
        seen.add(key)
        if not row["seeds"] or len(set(row["seeds"])) != len(row["seeds"]):
            raise ValueError(f"{path}: row {key}: seeds must be a non-empty list of distinct ints")
        for part in (row["table"], row["name"]):
            if not part or any(c in part for c in "/ =,"):
                raise ValueError(f"{path}: row {key}: table and name must be plain path parts")
        if row.get("paper_ppl") is not None and not isinstance(row["paper_ppl"], (int, float)):
            raise ValueError(f"{path}: row {key}: paper_ppl must be a number")
        _check_row_train(path, key, row.get("train", {}))
        get_config(f"{row['arch']}-{rec['size']}", **row_model_overrides(row, shp, rec["size"]))
    return {"recipe": rec, "shape": shp, "rows": rows, "path": path}


def _check_row_train(path: str, key, train: dict) -> None:
    """A row's ``train`` settings: ``TrainConfig`` fields other than those every run's recipe and seed set."""
    import dataclasses

    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fixed = {"preset", "model_overrides", "data", "out", "seed", "max_steps", "progress"}
    bad = sorted(set(train) - (fields - fixed)) if isinstance(train, dict) else [repr(train)]
    if bad:
        raise ValueError(f"{path}: row {key}: train must be a table of TrainConfig settings the row may change; "
                         f"not {bad}")


def row_model_overrides(row: dict, shape: dict, size: str = "tiny") -> dict:
    """Model config overrides of one row: the sweep's shape, then the row's own overrides. Without a
    ``glu_dim`` in the shape it follows ``d_model`` as in the 385M presets: ``glu_dim_for(d)`` for TNL, and
    ``+ d/3`` (rounded to 64) for the Transformer, whose SwiGLU then matches TNL's parameter count
    (it has no gate projection). A row with ``match_params = true`` gets the ``glu_dim`` (a multiple of 64
    where one is within 0.5%, else the nearest integer) that brings its parameter count closest to the
    same architecture's without the row's overrides (e.g. the gate removed and the SGLU widened to match)."""
    from .models.config import glu_dim_for

    over = dict(shape)
    if "d_model" in over and "glu_dim" not in over:
        g = glu_dim_for(over["d_model"])
        over["glu_dim"] = g if row["arch"] == "tnl" else int(round((g + over["d_model"] / 3) / 64)) * 64
    out = {**over, **row["overrides"]}
    if row.get("match_params"):
        out["glu_dim"] = _matched_glu_dim(f"{row['arch']}-{size}", over, out)
    return out


def _param_count(preset: str, overrides: dict) -> int:
    import torch

    from .models import build_model, get_config

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return build_model(get_config(preset, **overrides)).num_parameters()


def _matched_glu_dim(preset: str, base: dict, row: dict) -> int:
    """The ``glu_dim`` that gives ``row``'s overrides the parameter count of ``base``'s (both on ``preset``);
    parameters grow linearly with ``glu_dim``, so two counts find it."""
    target = _param_count(preset, base)
    g0 = row.get("glu_dim") or base.get("glu_dim") or 64
    p0, p1 = _param_count(preset, {**row, "glu_dim": g0}), _param_count(preset, {**row, "glu_dim": g0 + 64})
    exact = g0 + 64 * (target - p0) / (p1 - p0)
    rounded = max(64, int(round(exact / 64)) * 64)
    per_unit = (p1 - p0) / 64
    if abs(p0 + per_unit * (rounded - g0) - target) <= LEVEL_MARGIN * target:
        return rounded
    return max(1, int(round(exact)))


@dataclass
class Run:
    table: str
    name: str
    seed: int
    preset: str
    model: dict
    settings: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.table}/{self.name}/seed{self.seed}"


def _steps(rec: dict) -> int:
    per_step = rec["seq_len"] * rec["batch_size"] * rec["grad_accum"]
    return max(1, rec["tokens"] // per_step)


def plan_runs(spec: dict) -> list[Run]:
    """Every (row, seed) as a Run, in spec order with the seeds interleaved (seed 1 of every row first),
    so that a sweep stopped early has one seed of every row rather than all seeds of a few."""
    rec = spec["recipe"]
    steps = _steps(rec)
    settings = {
        "seq_len": rec["seq_len"], "batch_size": rec["batch_size"], "grad_accum": rec["grad_accum"],
        "lr": rec["lr"], "min_lr_ratio": rec["min_lr_ratio"], "max_steps": steps,
        "warmup_steps": max(1, int(steps * rec["warmup_frac"])), "weight_decay": rec["weight_decay"],
        "grad_clip": rec["grad_clip"], "eval_every": max(1, math.ceil(steps / rec["evals"])),
        "eval_tokens": rec["eval_tokens"], "eval_sets": ",".join(rec["eval_sets"]),
        "data_seed": rec["data_seed"], "compile": rec["compile"], "dtype": rec["dtype"],
        "ckpt_every": max(1, steps // max(1, rec["ckpts"])), "progress": False,
    }
    runs = []
    for i in range(max(len(r["seeds"]) for r in spec["rows"])):
        for row in spec["rows"]:
            if i < len(row["seeds"]):
                runs.append(Run(row["table"], row["name"], row["seeds"][i], f"{row['arch']}-{rec['size']}",
                                row_model_overrides(row, spec["shape"], rec["size"]),
                                {**settings, **row.get("train", {}), "seed": row["seeds"][i]}))
    return runs


def _finished(results: str, run: Run) -> bool:
    return os.path.exists(os.path.join(results, run.key, "final.json"))


def _command(run: Run, data: str, work_dir: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "tnlib", "train", "--preset", run.preset, "--data", data, "--out", work_dir]
    if run.model:
        cmd += ["--model"] + [f"{k}={json.dumps(v)}" for k, v in run.model.items()]
    cmd += ["--set"] + [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in run.settings.items()]
    return cmd + (["--resume"] if resume else [])


def _collect(run: Run, work_dir: str, results: str) -> dict | None:
    """Copy a finished run's small files to ``results/<key>/``; None if the run did not finish."""
    from .report import read_metrics

    mpath = os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isdir(os.path.join(work_dir, "final")) or not os.path.exists(mpath):
        return None
    recs = read_metrics(mpath)
    if any(r.get("event") == "interrupted" for r in recs[-1:]):
        return None
    start = next(r for r in recs if r.get("event") == "start")
    steps = [r for r in recs if "tokens_per_s" in r]
    last_eval = [r for r in recs if "val_loss" in r or any(k.endswith("_ppl") for k in r)][-1]
    tps = sorted(r["tokens_per_s"] for r in steps[min(5, len(steps) - 1):])
    final = {"table": run.table, "name": run.name, "seed": run.seed, "preset": run.preset, "overrides": run.model,
             "params": start["params"], "steps": steps[-1]["step"], "tokens": steps[-1]["tokens"],
             "train_loss": steps[-1]["loss"], "tokens_per_s": tps[len(tps) // 2],
             "wall_s": steps[-1]["elapsed_s"],
             **{k: v for k, v in last_eval.items() if k.endswith(("_loss", "_ppl", "_bpb")) and k != "loss"},
             "provenance": start["provenance"]}
    out = os.path.join(results, run.key)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(mpath, os.path.join(tmp, "metrics.jsonl"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"train": start["config"], "model": start["model"], "data_meta": start.get("data_meta"),
                   "provenance": start["provenance"]}, f, indent=1)
    with open(os.path.join(tmp, "final.json"), "w") as f:  # written last: its presence marks the run finished
        json.dump(final, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(os.path.join(work_dir, "checkpoint"), ignore_errors=True)  # the weights stay in final/
    return final


def run_sweep(spec: dict, data: str, results: str, work: str, parallel: int = 1, gpus: list[str] | None = None,
              limit: int | None = None, only: list[str] | None = None) -> dict:
    """Train every unfinished run of ``spec`` (``parallel`` processes at a time; with ``gpus`` the slots
    take those devices in turn), collect each finished run, then write the summaries. ``limit`` starts at
    most that many runs (for tests and dry runs); ``only`` keeps runs whose key starts with one of its
    entries (``"C"``, ``"C/ape"``). SIGINT/SIGTERM are passed to the running trainings, which checkpoint."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if not os.path.exists(os.path.join(data, "meta.json")):
        raise FileNotFoundError(f"{data}/meta.json not found: prepare the data first (python -m tnlib prepare)")
    runs = plan_runs(spec)
    if only:
        runs = [r for r in runs if any((r.key + "/").startswith(o.rstrip("/") + "/") for o in only)]
    todo = [r for r in runs if not _finished(results, r)]
    n_done = len(runs) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    print(f"sweep: {len(runs)} runs, {n_done} finished, {len(todo)} to run, {parallel} at a time, "
          f"{spec['recipe']['tokens']:,} tokens each", flush=True)
    stop = {"signal": None}
    running: dict[int, tuple] = {}  # slot -> (Popen, Run, work_dir, t0, log)

    def on_signal(signum, frame):
        stop["signal"] = signum
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed, t_sweep = [], time.time()
    queue = list(todo)
    try:
        while queue or running:
            for slot in range(parallel):
                if slot in running or not queue or stop["signal"]:
                    continue
                run = queue.pop(0)
                wdir = os.path.join(work, run.key)
                resume = os.path.isdir(os.path.join(wdir, "checkpoint"))
                os.makedirs(wdir, exist_ok=True)
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                log = open(os.path.join(wdir, "train.log"), "a")
                proc = subprocess.Popen(_command(run, data, wdir, resume), stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # our signal handler forwards signals
                running[slot] = (proc, run, wdir, time.time(), log)
                print(f"start {run.key}{' (resume)' if resume else ''}", flush=True)
            time.sleep(0.2)
            for slot, (proc, run, wdir, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                final = _collect(run, wdir, results)  # also after a late signal: it checks the run finished
                if final:
                    n_done += 1
                    evals = " ".join(f"{k}={final[k]:.3f}" for k in final if k.endswith("_ppl"))
                    print(f"done  {run.key} [{n_done}/{len(runs)}] {time.time() - t0:.0f}s "
                          f"{final['tokens_per_s']:,.0f} tok/s {evals} (sweep {time.time() - t_sweep:.0f}s)",
                          flush=True)
                elif not stop["signal"]:
                    failed.append(run.key)
                    with open(os.path.join(wdir, "train.log")) as f:
                        tail = f.readlines()[-15:]
                    print(f"FAILED {run.key} (exit {proc.returncode}):\n" + "".join(tail), flush=True)
            if stop["signal"] and not running:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    from .provenance import provenance

    doc = summarize(spec, results, sweep_provenance=provenance())
    if stop["signal"]:
        print(f"sweep interrupted by {signal.Signals(stop['signal']).name}: run it again to resume", flush=True)
    return {"finished": n_done, "total": len(runs), "failed": failed, "interrupted": stop["signal"] is not None,
            "summary": doc}


def _speed_table(results: str) -> dict:
    """``{"table/name": tokens/s}`` from the newest ``speed-385m*.json`` written by tools/ablation_speed.py."""
    files = sorted(glob.glob(os.path.join(results, "speed-385m*.json")), key=os.path.getmtime)
    if not files:
        return {}
    with open(files[-1]) as f:
        doc = json.load(f)
    return {f"{r['table']}/{r['name']}": r["tokens_per_s"] for r in doc.get("rows", [])}


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(xs), "max": max(xs)}


def _previous_sweep_provenance(results: str) -> dict | None:
    """The provenance of the sweep that trained the runs, from an earlier ``results/summary.json``: its
    ``sweep_provenance``, or (a file written before that field existed) its ``provenance`` unless that
    was itself a ``--summarize``."""
    p = os.path.join(results, "summary.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        prev = json.load(f)
    if prev.get("sweep_provenance"):
        return prev["sweep_provenance"]
    prov = prev.get("provenance") or {}
    return prov if prov.get("command") and "--summarize" not in prov["command"] else None


def summarize(spec: dict, results: str, sweep_provenance: dict | None = None) -> dict:
    """Write ``results/<table>/summary.json`` + ``curves.png`` (each table with the default row beside it)
    and ``results/summary.json`` (every row: seeds, val_ppl per seed, tokens, tokens/s at 385M).
    ``provenance`` is this call's; ``sweep_provenance`` the sweep's that trained the runs (given by
    run_sweep, else kept from the previous summary), so a re-summary elsewhere loses neither."""
    from .provenance import provenance

    if sweep_provenance is None:
        sweep_provenance = _previous_sweep_provenance(results)
    speed = _speed_table(results)
    rows_out = []
    for row in spec["rows"]:
        finals = []
        for s in row["seeds"]:
            p = os.path.join(results, row["table"], row["name"], f"seed{s}", "final.json")
            finals.append(json.load(open(p)) if os.path.exists(p) else None)
        done = [f for f in finals if f]
        ppl_keys = sorted({k for f in done for k in f if k.endswith("_ppl")}
                          | {f"{e}_ppl" for e in spec["recipe"]["eval_sets"]})
        entry = {"table": row["table"], "name": row["name"], "arch": row["arch"], "overrides": row["overrides"],
                 "seeds": row["seeds"], "val_ppl": [f and f.get("val_ppl") for f in finals],
                 "tokens": done[0]["tokens"] if done else None, "params": done[0]["params"] if done else None,
                 "tokens_per_s": [f and f["tokens_per_s"] for f in finals],
                 "tokens_per_s_385m": speed.get(f"{row['table']}/{row['name']}"),
                 "complete": len(done) == len(finals),
                 **({"match_params": True} if row.get("match_params") else {}),
                 **({"train": row["train"]} if row.get("train") else {})}
        for k in ppl_keys:
            entry[k + "_stats"] = _stats([f and f.get(k) for f in finals])
        if entry["params"] is None:  # not run yet: counted from its config (the data's vocabulary, when known)
            vocab = next((json.load(open(p))["model"]["vocab_size"] for p in sorted(glob.glob(
                os.path.join(results, "*", "*", "seed*", "config.json")))), None)
            over = row_model_overrides(row, spec["shape"], spec["recipe"]["size"])
            entry["params"] = _param_count(f"{row['arch']}-{spec['recipe']['size']}",
                                           {**over, **({"vocab_size": vocab} if vocab else {})})
        entry["paper_ppl"] = row.get("paper_ppl")
        entry["provenance"] = done[0]["provenance"] if done else None
        rows_out.append(entry)
    _add_verdicts(spec, rows_out)
    provs = [r["provenance"] for r in rows_out if r["provenance"]]
    # what ran (the sweep may have been given --shape/--set elsewhere): the first finished run's config
    ran = sorted(glob.glob(os.path.join(results, "default", "default", "seed*", "config.json"))) or \
        sorted(glob.glob(os.path.join(results, "*", "*", "seed*", "config.json")))
    ran_cfg = json.load(open(ran[0])) if ran else None
    head = {"spec": spec["path"], "recipe": spec["recipe"], "shape": spec["shape"],
            "ran_train_config": {k: v for k, v in ran_cfg["train"].items() if k not in ("seed", "out")}
            if ran_cfg else None,
            "ran_shape": {k: ran_cfg["model"][k] for k in ("d_model", "n_layers", "n_heads", "glu_dim", "vocab_size")}
            if ran_cfg else None,
            "runs_provenance": {k: provs[0].get(k) for k in ("commit", "gpu", "torch", "triton", "cuda", "python", "date")}
            if provs else None,
            "runs_commits": sorted({p.get("commit") for p in provs}), "runs_gpus": sorted({str(p.get("gpu")) for p in provs}),
            "sweep_provenance": sweep_provenance, "provenance": provenance()}
    os.makedirs(results, exist_ok=True)
    default = next((r for r in rows_out if r["table"] == "default"), None)
    for table in dict.fromkeys(r["table"] for r in rows_out):
        rows = [r for r in rows_out if r["table"] == table]
        if default and table != "default":
            rows = [default] + rows
        os.makedirs(os.path.join(results, table), exist_ok=True)
        with open(os.path.join(results, table, "summary.json"), "w") as f:
            json.dump({**head, "table": table, "rows": rows}, f, indent=1)
        _plot_table(results, table, rows)
    doc = {**head, "rows": rows_out}
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def _add_verdicts(spec: dict, rows: list[dict]) -> None:
    """Every row but the default gets ``verdict`` (on val) and ``verdict_heldout`` (on the held-out books,
    when evaluated), with the numbers behind them and ``rule`` (``VERDICT_RULE``); rows without finished
    seeds get ``verdict: None``."""
    default = next((r for r in rows if r["table"] == "default"), None)
    paper_default = default and default.get("paper_ppl")
    for r in rows:
        r["rule"] = VERDICT_RULE
        if r is default:
            r["verdict"] = None
            continue
        pd_ = None if r.get("paper_ppl") is None or not paper_default else r["paper_ppl"] / paper_default - 1
        r["paper_delta_pct"] = None if pd_ is None else 100 * pd_
        for key, tag in (("val_ppl", ""), ("eval-heldout_ppl", "_heldout")):
            a, b = r.get(key + "_stats"), default and default.get(key + "_stats")
            if not a or not b or a.get("mean") is None or b.get("mean") is None:
                r["verdict" + tag] = None
                continue
            delta = a["mean"] / b["mean"] - 1
            spread = max(a["std"] / a["mean"], b["std"] / b["mean"])
            r["delta_pct" + tag], r["two_s_pct" + tag] = 100 * delta, 200 * spread
            r["verdict" + tag] = verdict(pd_, delta, spread)


def _plot_table(results: str, table: str, rows: list[dict]) -> None:
    """Training loss (smoothed) against tokens, one colour per row and one line per seed, and the
    held-out perplexities at the evaluation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import read_metrics

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    any_data = False
    for i, row in enumerate(rows):
        color = f"C{i}"
        for j, s in enumerate(row["seeds"]):
            p = os.path.join(results, row["table"], row["name"], f"seed{s}", "metrics.jsonl")
            if not os.path.exists(p):
                continue
            recs = read_metrics(p)
            steps = [r for r in recs if "tokens_per_s" in r]
            ema, xs, ys = None, [], []
            for r in steps:
                ema = r["loss"] if ema is None else 0.95 * ema + 0.05 * r["loss"]
                xs.append(r["tokens"] / 1e6)
                ys.append(ema)
            label = f"{row['table']}/{row['name']}" if j == 0 else None
            ax1.plot(xs, ys, color=color, lw=1, alpha=0.8, label=label)
            ev = [r for r in recs if "val_ppl" in r]
            ax2.plot([r["tokens"] / 1e6 for r in ev], [r["val_ppl"] for r in ev], "o-", color=color, ms=3, lw=1,
                     alpha=0.8, label=label)
            any_data = True
    if not any_data:
        plt.close(fig)
        return
    ax1.set(xlabel="tokens (M)", ylabel="training loss (nats, EMA 0.95)", title=f"table {table}: training loss")
    ax2.set(xlabel="tokens (M)", ylabel="validation perplexity", title="held-out (val) perplexity", yscale="log")
    ys_all = [l.get_ydata() for l in ax1.get_lines()]
    tail = [y for ys in ys_all for y in ys[len(ys) // 5:]]
    if tail:
        ax1.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results, table, "curves.png"), dpi=110)
    plt.close(fig)
