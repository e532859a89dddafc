"""Command line: ``python -m tnlib {prepare,train,generate,compare,quickstart,sweep} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys

DEFAULT_CORPUS = "../shared/data/corpus-gutenberg-*.txt.xz"
SHARED_EVALS = {
    "heldout": "../shared/data/gutenberg-heldout.txt.xz",
    "wikitext-valid": "../shared/data/wikitext103-valid.txt",
    "wikitext-test": "../shared/data/wikitext103-test.txt",
}
SAMPLE = {
    "corpus": "data/sample/gutenberg-sample.txt.xz",
    "tokenizer": "data/sample/tokenizer.json",
    "evals": {"heldout": "data/sample/heldout-sample.txt.xz", "wikitext-valid": "data/sample/wikitext103-valid-sample.txt"},
}


def _kv(items):
    """``["lr=3e-4", "compile=true"]`` -> ``{"lr": 3e-4, "compile": True}`` (JSON values, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_prepare(a):
    from .data import prepare_data

    evals = dict(e.split("=", 1) for e in a.eval) if a.eval else {}
    corpus = a.corpus
    if len(corpus) == 1 and any(ch in corpus[0] for ch in "*?["):
        corpus = sorted(glob.glob(corpus[0])) or corpus
    meta = prepare_data(corpus, a.out, vocab_size=a.vocab_size, val_permille=a.val_permille, eval_sets=evals,
                        tokenizer=a.tokenizer, tokenizer_docs=a.tokenizer_docs, force=a.force)
    print(json.dumps(meta["splits"], indent=1))


def cmd_train(a):
    from .train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = _kv(a.set)
    bad = set(kw) - fields
    if bad:
        raise SystemExit(f"unknown training options {sorted(bad)}; choose from {sorted(fields)}")
    own_flag = {"model_overrides": "--model k=v ...", "preset": "--preset", "data": "--data", "out": "--out"}
    clash = sorted(set(kw) & set(own_flag))
    if clash:
        raise SystemExit(f"set {clash[0]} with {own_flag[clash[0]]}, not --set")
    if "eval_sets" in kw and isinstance(kw["eval_sets"], str):
        kw["eval_sets"] = tuple(kw["eval_sets"].split(","))
    cfg = TrainConfig(preset=a.preset, data=a.data, out=a.out, model_overrides=_kv(a.model), **kw)
    res = train(cfg, resume=a.resume)
    print(json.dumps(res, indent=1))


def cmd_generate(a):
    import torch

    from .data import load_tokenizer
    from .generation import stream_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, official_eos = _load_any_checkpoint(a.checkpoint, device)
    tok = load_tokenizer(a.tokenizer or a.checkpoint)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens but the model only {model.config.vocab_size}")
    ids = tok.encode(a.prompt).ids
    if not ids:
        raise SystemExit("the prompt encodes to no tokens")
    eot = official_eos if official_eos is not None else tok.token_to_id("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(a.seed)
    print(a.prompt, end="", flush=True)
    out = []
    for t in stream_generate(model, torch.tensor([ids]), a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                             eos_token_id=eot, generator=g, decoder="compiled-graph" if a.fused else "auto"):
        if int(t[0]) == eot:
            break
        out.append(int(t[0]))
        text = tok.decode(out)
        print(text[len(tok.decode(out[:-1])):], end="", flush=True)
    print()


def _load_any_checkpoint(path, device):
    """``(model, eos_token_id)`` from a ``save_model`` directory or an official TransNormerLLM one (told
    apart by its ``config.json``); the end token id is the official config's (``None`` for tnlib's)."""
    from .models import load_model
    from .official import is_official_dir, load_official

    if is_official_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            eos = json.load(f).get("eos_token_id")
        return load_official(path, device=device), eos
    return load_model(path, device=device), None


def cmd_convert(a):
    import torch

    from .models import load_model, save_model
    from .official import is_official_dir, load_official, save_official

    src = a.from_official or a.to_official
    if os.path.abspath(src) == os.path.abspath(a.out):
        raise SystemExit("--out must differ from the input directory")
    if os.path.isfile(os.path.join(src, "config.json")) and is_official_dir(src) != bool(a.from_official):
        flag, other = ("--from-official", "--to-official") if a.from_official else ("--to-official", "--from-official")
        layout = "the official layout" if is_official_dir(src) else "tnlib's save_model format"
        raise SystemExit(f"{flag} {src}: that directory is in {layout}; did you mean {other}?")
    if a.from_official:
        model = load_official(a.from_official, dtype=a.dtype)
        save_model(model, a.out)
        print(f"wrote {a.out} (tnlib save_model format; python -m tnlib generate --checkpoint {a.out} ...)")
    else:
        model = load_model(a.to_official)
        if a.dtype:
            model = model.to(getattr(torch, a.dtype))
        save_official(model, a.out, max_shard_size=a.max_shard_size)
        print(f"wrote {a.out} (official TransNormerLLM layout)")


def _add_convert_parser(sub):
    p = sub.add_parser("convert", help="convert between the official TransNormerLLM checkpoint layout and tnlib's")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-official", metavar="DIR",
                     help="an official checkpoint directory -> tnlib's save_model format")
    src.add_argument("--to-official", metavar="DIR", help="a save_model directory -> the official layout (safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype of the output (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="--to-official: largest safetensors shard (e.g. 2GB)")
    p.set_defaults(fn=cmd_convert)


def cmd_compare(a):
    from .report import compare_runs

    runs = dict(r.split("=", 1) for r in a.runs)
    runs = {k: (os.path.join(v, "metrics.jsonl") if os.path.isdir(v) else v) for k, v in runs.items()}
    compare_runs(runs, a.out, a.title, tuple(a.evals), _kv(a.extra))
    print(open(os.path.join(a.out, "summary.md")).read())


def cmd_quickstart(a):
    from .quickstart import quickstart

    quickstart(out=a.out, steps=a.steps, work=a.work)


def cmd_sweep(a):
    from .sweep import load_spec, run_sweep, summarize

    spec = load_spec(a.spec, shape=_kv(a.shape), recipe=_kv(a.set))
    if a.summarize:
        doc = summarize(spec, a.results)
        print(f"wrote {a.results}/summary.json ({sum(r['complete'] for r in doc['rows'])}/{len(doc['rows'])} rows complete)")
        return
    res = run_sweep(spec, a.data, a.results, a.work, parallel=a.parallel,
                    gpus=a.gpus.split(",") if a.gpus else None, limit=a.limit, only=a.only)
    print(f"sweep: {res['finished']}/{res['total']} runs finished" + (f", failed: {res['failed']}" if res["failed"] else ""))
    if res["failed"] or res["interrupted"]:
        sys.exit(1)


def _add_sweep_parser(sub):
    p = sub.add_parser("sweep", help="ablation sweep from a TOML spec (resumable; see tnlib/sweep.py)")
    p.add_argument("spec", help="e.g. configs/ablations.toml")
    p.add_argument("--data", default="data/full", help="a prepared data directory")
    p.add_argument("--results", default="results/ablation", help="finished runs and summaries")
    p.add_argument("--work", default="runs/ablation", help="checkpoints of runs in progress")
    p.add_argument("--parallel", type=int, default=1, help="training processes at a time (they may share a GPU)")
    p.add_argument("--gpus", default=None, help="comma-separated CUDA devices the slots take in turn")
    p.add_argument("--shape", nargs="*", default=[], help="override [shape], e.g. d_model=768 n_layers=12")
    p.add_argument("--set", nargs="*", default=[], help="override [recipe], e.g. tokens=30000000")
    p.add_argument("--only", nargs="*", default=None, help="run only these tables or rows, e.g. C default/default")
    p.add_argument("--limit", type=int, default=None, help="start at most this many runs")
    p.add_argument("--summarize", action="store_true", help="only (re)write the summaries from finished runs")
    p.set_defaults(fn=cmd_sweep)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tnlib", description="TransNormerLLM, step by step")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into flat uint16 token files + meta.json")
    p.add_argument("--corpus", nargs="+", default=[DEFAULT_CORPUS], help="files, dirs, globs or hub:<id>")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=50272)
    p.add_argument("--val-permille", type=int, default=5, help="documents per 1000 held out for val")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--tokenizer-docs", type=int, default=None, help="train the tokenizer on the first N train docs")
    p.add_argument("--eval", nargs="*", default=[], help="name=path held-out sets to tokenize too")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="train a preset on prepared data")
    p.add_argument("--preset", default="tnl-tiny")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[], help="TrainConfig fields, e.g. max_steps=1000 lr=6e-4")
    p.add_argument("--model", nargs="*", default=[], help="model config overrides, e.g. gate=false")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate text from a saved model")
    p.add_argument("--checkpoint", required=True,
                   help="a directory written by save_model (e.g. RUN/final) or an official TransNormerLLM one")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one inside --checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true", help="GPU: compile the CUDA-graph decode step (faster per token)")
    p.set_defaults(fn=cmd_generate)

    _add_convert_parser(sub)

    p = sub.add_parser("compare", help="summary.json + curves.png of several runs")
    p.add_argument("--runs", nargs="+", required=True, help="name=RUN_DIR (or name=metrics.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--evals", nargs="*", default=["val"])
    p.add_argument("--extra", nargs="*", default=[], help="key=value added to summary.json")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("quickstart", help="tiny TNL vs Transformer on the shipped sample (CPU, minutes)")
    p.add_argument("--out", default="results/quickstart")
    p.add_argument("--work", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(fn=cmd_quickstart)

    _add_sweep_parser(sub)
    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError: say it plainly
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
