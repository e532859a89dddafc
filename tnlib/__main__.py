"""Command line: ``python -m tnlib {prepare,train,generate,quickstart} ...`` (``--help`` on each)."""
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
    from .generate import stream_generate
    from .models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(a.checkpoint, device=device)
    tok = load_tokenizer(a.tokenizer)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens but the model only {model.config.vocab_size}")
    ids = tok.encode(a.prompt).ids
    if not ids:
        raise SystemExit("the prompt encodes to no tokens")
    eot = tok.token_to_id("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(a.seed)
    print(a.prompt, end="", flush=True)
    out = []
    for t in stream_generate(model, torch.tensor([ids]), a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                             eos_token_id=eot, generator=g, fuse_step=a.fused):
        if int(t[0]) == eot:
            break
        out.append(int(t[0]))
        text = tok.decode(out)
        print(text[len(tok.decode(out[:-1])):], end="", flush=True)
    print()


def cmd_compare(a):
    from .report import compare_runs

    runs = dict(r.split("=", 1) for r in a.runs)
    runs = {k: (os.path.join(v, "metrics.jsonl") if os.path.isdir(v) else v) for k, v in runs.items()}
    compare_runs(runs, a.out, a.title, tuple(a.evals), _kv(a.extra))
    print(open(os.path.join(a.out, "summary.md")).read())


def cmd_quickstart(a):
    from .quickstart import quickstart

    quickstart(out=a.out, steps=a.steps, work=a.work)


def cmd_consolidate(a):
    from .parallel import consolidate

    print(consolidate(a.checkpoint, a.out))


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
    p.add_argument("--checkpoint", required=True, help="a directory written by save_model (e.g. RUN/final)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true", help="GPU: compile the CUDA-graph decode step (faster per token)")
    p.set_defaults(fn=cmd_generate)

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

    p = sub.add_parser("consolidate", help="one-file model (save_model format) from a training checkpoint, sharded or not")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint (written by train, e.g. with parallel=fsdp)")
    p.add_argument("--out", required=True, help="directory for model.safetensors + config.json (tnlib.load_model)")
    p.set_defaults(fn=cmd_consolidate)

    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError: say it plainly
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
