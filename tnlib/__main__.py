"""Command line: ``python -m tnlib {prepare,download,train,evaluate,generate,convert,compare,quickstart,sweep,
consolidate,gpu-check} ...`` (``--help`` on each; ``python -m tnlib`` alone lists the commands).

Every error is one line on stderr, ``error: ...``, with exit status 2, and nothing is written: argument
errors (checked before any work), bad config values, missing paths, changed settings on ``--resume``,
and damaged files (``tnlib.files.FileDamaged``: ``error: <file>: <what is wrong> (<what to do>)``).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys

from .files import FileDamaged, read_json
from .quickstart import DEFAULT_STEPS as QUICKSTART_STEPS

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


class CommandError(Exception):
    """A mistake on the command line found by a command (``main`` prints ``error: <message>``, exit 2)."""


def _kv(items, parse_json: bool = True):
    """``["lr=3e-4", "compile=true"]`` -> ``{"lr": 3e-4, "compile": True}`` (JSON values, else strings).

    With ``parse_json=False`` the values stay strings: config fields parse them into their declared
    types themselves (``tnlib.fields``), so ``gate=False`` and ``gate=false`` both mean False and
    ``gate=maybe`` is an error instead of a truthy string."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CommandError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not parse_json:
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _train_config(a):
    """The TrainConfig of ``train``'s arguments, every field type-checked (raises before any work)."""
    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = _kv(a.set, parse_json=False)
    own_flag = {"model_overrides": "--model k=v ...", "preset": "--preset", "data": "--data", "out": "--out"}
    bad = set(kw) - fields
    if bad:  # the fields --set takes: not those with their own flag
        raise CommandError(f"unknown training options {sorted(bad)}; --set takes {sorted(fields - set(own_flag))}")
    clash = sorted(set(kw) & set(own_flag))
    if clash:
        raise CommandError(f"set {clash[0]} with {own_flag[clash[0]]}, not --set")
    return TrainConfig(preset=a.preset, data=a.data, out=a.out, model_overrides=_kv(a.model, parse_json=False), **kw)


def cmd_prepare(a):
    from .data import _split_transform, load_tokenizer, prepare_data

    if a.tokenizer:  # checked before anything is written
        load_tokenizer(a.tokenizer)

    evals = dict(e.split("=", 1) for e in a.eval) if a.eval else {}
    for name, spec in evals.items():  # said before the corpus is read and tokenized, not after
        path = _split_transform(spec)[1]
        if not path.startswith("hub:") and not glob.glob(path):
            raise CommandError(f"--eval {name}: {path} does not exist")
    corpus = a.corpus
    if corpus == [DEFAULT_CORPUS] and not glob.glob(DEFAULT_CORPUS):
        raise CommandError(f"no corpus at {DEFAULT_CORPUS} (the default --corpus): pass --corpus PATH, or fetch "
                           f"an open one from the Hugging Face hub with python -m tnlib download (make data does both)")
    if len(corpus) == 1 and any(ch in corpus[0] for ch in "*?["):
        corpus = sorted(glob.glob(corpus[0])) or corpus
    meta = prepare_data(corpus, a.out, vocab_size=a.vocab_size, val_permille=a.val_permille, eval_sets=evals,
                        tokenizer=a.tokenizer, tokenizer_docs=a.tokenizer_docs, force=a.force)
    print(json.dumps(meta["splits"], indent=1))


def cmd_download(a):
    from .download import download_open_data

    download_open_data(a.out, corpus_bytes=a.corpus_mb * 1_000_000, heldout_permille=a.heldout_permille,
                       force=a.force, local_corpus=a.local_corpus)


def _add_download_parser(sub):
    from .download import DEFAULT_CORPUS_BYTES, GUTENBERG

    p = sub.add_parser("download", help=f"fetch an open corpus ({GUTENBERG.repo}) and the WikiText-103 eval sets from "
                                        f"the Hugging Face hub into local files for prepare (what make data does "
                                        f"without a local corpus)")
    p.add_argument("--out", default="data/open", help="folder for the corpus, held-out and WikiText files")
    p.add_argument("--corpus-mb", type=_number(int, lo=1), default=DEFAULT_CORPUS_BYTES // 1_000_000,
                   help=f"MB of book text to keep from {GUTENBERG.repo} (split {GUTENBERG.split}), streamed in order")
    p.add_argument("--heldout-permille", type=_number(int, lo=1, hi=999), default=10,
                   help="books per 1000 of the stream set aside as the held-out eval set (by a hash of their id)")
    p.add_argument("--local-corpus", default=None,
                   help="where a local corpus was looked for first (make data passes its CORPUS), named in the error "
                        "when the hub cannot be reached")
    p.add_argument("--force", action="store_true", help="download again over a finished download in --out")
    p.set_defaults(fn=cmd_download)


def cmd_train(a):
    from .train import train

    cfg = _train_config(a)
    res = train(cfg, resume=a.resume)
    print(json.dumps(res, indent=1))


def _check_checkpoint_dir(path: str, flag: str = "--checkpoint") -> None:
    """A directory with a ``config.json`` (written by save_model, or an official one), or an error that
    says what ``path`` is instead and where a checkpoint is (e.g. ``RUN/final``)."""
    if os.path.isfile(path):
        raise CommandError(f"{flag} {path} is a file, not a checkpoint directory (pass the directory that holds "
                           f"config.json and the weights)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    hint = ""
    for sub in ("final", "checkpoint"):
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            hint = f"; did you mean {os.path.join(path, sub)} (the run's saved model)?"
            break
    what = "does not exist" if not os.path.exists(path) else "has no config.json"
    raise CommandError(f"{flag} {path} {what}{hint}")


def _tokenizer_hint(checkpoint: str) -> str:
    """Where a tokenizer for ``checkpoint`` is: the data of the run that wrote it (found through the run's
    training checkpoint), else what to pass."""
    from .official import is_official_dir

    if is_official_dir(checkpoint):
        return ("the releases ship a SentencePiece tokenizer.model: convert it to a tokenizer.json once and pass "
                "--tokenizer, see the README's 'Using the released models'")
    for run_cfg in (os.path.join(checkpoint, os.pardir, "checkpoint", "config.json"),
                    os.path.join(checkpoint, "config.json")):
        try:
            data = read_json(run_cfg, "")["train"]["data"]
        except (OSError, ValueError, KeyError, TypeError):  # no training run around it: no hint from there
            continue
        tok = os.path.join(str(data), "tokenizer.json")
        if os.path.isfile(tok):
            return f"pass --tokenizer {os.path.normpath(tok)}, the tokenizer of the data it was trained on"
    return "pass --tokenizer with the tokenizer.json of the data it was trained on (DATA/tokenizer.json, from prepare)"


def cmd_generate(a):
    _check_checkpoint_dir(a.checkpoint)
    if a.tokenizer is not None and not os.path.isfile(a.tokenizer):
        raise CommandError(f"--tokenizer {a.tokenizer} does not exist")
    tok_path = a.tokenizer or os.path.join(a.checkpoint, "tokenizer.json")
    if not os.path.isfile(tok_path):  # said before the model is loaded
        raise CommandError(f"{a.checkpoint} holds no tokenizer.json ({_tokenizer_hint(a.checkpoint)})")

    import torch

    from .data import load_tokenizer
    from .generation import stream_generate

    tok = load_tokenizer(tok_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, official_eos = _load_any_checkpoint(a.checkpoint, device)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise CommandError(f"{tok_path}: the tokenizer has {tok.get_vocab_size()} tokens but the model only "
                           f"{model.config.vocab_size} (pass the tokenizer it was trained with)")
    ids = tok.encode(a.prompt).ids
    if not ids:
        raise CommandError(f"--prompt {a.prompt!r} encodes to no tokens (give some text to continue)")
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


def cmd_evaluate(a):
    """Score a saved model on held-out sets of a prepared directory: every token of each set (or the first
    ``--max-tokens``), in windows of ``--seq-len``; writes the results as JSON and prints a table."""
    _check_checkpoint_dir(a.checkpoint)
    from .data import TokenFile, load_tokenizer, tokenizer_hash

    meta = read_json(os.path.join(a.data, "meta.json"), "prepare the data again") if os.path.isfile(
        os.path.join(a.data, "meta.json")) else None
    if meta is None:
        raise CommandError(f"--data {a.data} has no meta.json (a directory written by `python -m tnlib prepare`)")
    sets = a.sets or ["val"] + sorted(s for s in meta["splits"] if s.startswith("eval-"))
    tfs = {s: TokenFile.open(a.data, s) for s in sets}  # every set checked before the model is loaded
    tok_path = os.path.join(a.checkpoint, "tokenizer.json")
    if os.path.isfile(tok_path) and tokenizer_hash(load_tokenizer(tok_path)) != meta["tokenizer_sha256"]:
        raise CommandError(f"{tok_path} is not the tokenizer {a.data} was prepared with (scores would be meaningless)")
    out = a.out or os.path.join(a.checkpoint, "evals.json")

    import torch

    from .progress import tqdm
    from .provenance import provenance
    from .train import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = _load_any_checkpoint(a.checkpoint, device)
    if model.config.vocab_size < meta["vocab_size"]:
        raise CommandError(f"{a.checkpoint}: the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                           f"data's ({meta['vocab_size']})")
    amp = torch.bfloat16 if device.type == "cuda" else None  # as training's dtype=auto on a GPU with bf16
    res = {}
    for name in tqdm(sets, desc="evaluate", unit="set", disable=not sys.stderr.isatty()):
        r = evaluate(model, tfs[name], a.seq_len, a.max_tokens, a.batch_size, device, amp, meta["eot_id"])
        res[name] = {**r, "set_tokens": len(tfs[name].tokens)}
    doc = {"checkpoint": a.checkpoint, "data": a.data, "seq_len": a.seq_len, "max_tokens": a.max_tokens,
           "evals": res, "provenance": provenance()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'set':28s} {'tokens':>10s} {'loss':>8s} {'ppl':>10s} {'bits/byte':>10s}")
    for name, r in res.items():
        whole = "" if r["tokens"] == r["set_tokens"] else f" (of {r['set_tokens']:,})"
        print(f"{name:28s} {r['tokens']:>10,} {r['loss']:>8.4f} {r['ppl']:>10.3f} {r['bpb']:>10.4f}{whole}")
    print(f"wrote {out}")


def _load_any_checkpoint(path, device):
    """``(model, eos_token_id)`` from a ``save_model`` directory or an official TransNormerLLM one (told
    apart by its ``config.json``, checked first); the end token id is the official config's (``None``
    for tnlib's)."""
    from .models import load_model
    from .official import is_official_dir, load_official

    cfg = read_json(os.path.join(path, "config.json"), "restore the checkpoint directory from a copy")
    if is_official_dir(path):
        return load_official(path, device=device), cfg.get("eos_token_id")
    return load_model(path, device=device), None


def cmd_convert(a):
    import shutil

    import torch

    from .data import load_tokenizer
    from .models import load_model, save_model
    from .official import is_official_dir, load_official, save_official

    src = a.from_official or a.to_official
    flag, other = ("--from-official", "--to-official") if a.from_official else ("--to-official", "--from-official")
    _check_checkpoint_dir(src, flag)
    if os.path.abspath(src) == os.path.abspath(a.out):
        raise CommandError("--out must differ from the input directory")
    read_json(os.path.join(src, "config.json"), "restore the checkpoint directory from a copy")  # damaged: said so
    if is_official_dir(src) != bool(a.from_official):
        layout = "the official layout" if is_official_dir(src) else "tnlib's save_model format"
        raise CommandError(f"{flag} {src}: that directory is in {layout}; did you mean {other}?")
    tokenizer = os.path.join(src, "tokenizer.json")  # carried over when there is one
    tokenizer = tokenizer if os.path.isfile(tokenizer) else None
    if a.from_official:
        model = load_official(a.from_official, dtype=a.dtype)
        save_model(model, a.out, tokenizer=tokenizer)
        print(f"wrote {a.out} (tnlib save_model format; python -m tnlib generate --checkpoint {a.out} ...)")
    else:
        model = load_model(a.to_official)
        if tokenizer:
            load_tokenizer(tokenizer)  # checked before anything is written
        if a.dtype:
            model = model.to(getattr(torch, a.dtype))
        save_official(model, a.out, max_shard_size=a.max_shard_size)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(a.out, "tokenizer.json"))
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

    quickstart(out=a.out, steps=a.steps, work=a.work, threads=a.threads)


def cmd_sweep(a):
    from .sweep import load_spec, run_sweep, summarize

    spec = load_spec(a.spec, shape=_kv(a.shape), recipe=_kv(a.set))
    if a.summarize:
        doc = summarize(spec, a.results)
        print(f"wrote {a.results}/summary.json ({sum(r['complete'] for r in doc['rows'])}/{len(doc['rows'])} rows complete)")
        return
    res = run_sweep(spec, a.data, a.results, a.work, parallel=a.parallel,
                    gpus=a.gpus.split(",") if a.gpus else None, limit=a.limit, only=a.only)
    if res["failed"]:
        raise CommandError(f"sweep: {res['finished']}/{res['total']} runs finished; these failed: {res['failed']} "
                           f"(each one's train.log under {a.work} says why; run the sweep again to retry them)")
    print(f"sweep: {res['finished']}/{res['total']} runs finished")
    if res["interrupted"]:  # stopped on request, not an error: resumable, but not finished
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


def cmd_consolidate(a):
    from .parallel import consolidate

    print(consolidate(a.checkpoint, a.out))


def cmd_gpu_check(a):
    from .gpucheck import run_gpu_check

    sys.exit(run_gpu_check(a.target, a.presets, a.dtypes, a.max_spill, a.markdown, progress=not a.no_progress))


def _add_gpu_check_parser(sub):
    from .gpucheck import DEFAULT_MAX_SPILL
    from .ops.targets import TARGETS

    p = sub.add_parser("gpu-check", help="compile every kernel configuration for a GPU target and check that it fits "
                                         "(any machine, no GPU needed)")
    p.add_argument("--target", default=None,
                   help=f"{', '.join(TARGETS)}, several comma-separated, or all (default: this machine's GPU)")
    p.add_argument("--presets", nargs="*", default=None, help="model presets to cover (default: all)")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["bf16", "fp16", "fp32"],
                   help="input dtypes (default: the target's training dtype, bf16 or fp16, and fp32)")
    p.add_argument("--max-spill", type=_number(int, lo=0), default=DEFAULT_MAX_SPILL,
                   help="spill stores (bytes per thread) above which a configuration does not fit")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table of the targets' summaries")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(fn=cmd_gpu_check)


def _number(kind, lo=None, hi=None, lo_open=False, none_ok=False):
    """An argparse ``type`` that parses ``kind`` and checks its range, so bad values stop the command
    at parse time, before anything is loaded or printed."""

    def parse(text):
        if none_ok and text.strip().lower() in ("none", "null"):
            return None
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if v != v:  # NaN passes every comparison below
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {rng.replace('inf]', 'inf)')}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to each option's help, except where there is nothing to show
    (required options, flags, empty or None defaults: their help text says what happens)."""

    def _get_help_string(self, action):
        d = action.default
        nothing = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (str, list)) and not d)
        if action.required or nothing:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command shows each option's default in ``--help``; an argument error is one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # one line like every other error (argparse's default prints the usage block first)
        self.exit(2, f"error: {message} ({self.prog} --help shows every option)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m tnlib`` parser (every option has help text; ``tests/test_cli.py`` checks)."""
    from .models import PRESETS
    from .train import RESUME_MAY_CHANGE

    ap = _Parser(prog="python -m tnlib", description="TransNormerLLM, step by step")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser)  # no command: main prints the list

    p = sub.add_parser("prepare", help="tokenize a corpus into flat uint16 token files + meta.json")
    p.add_argument("--corpus", nargs="+", default=[DEFAULT_CORPUS], help="files, dirs, globs or hub:<id>")
    p.add_argument("--out", required=True, help="output directory (token files, tokenizer.json, meta.json)")
    p.add_argument("--vocab-size", type=_number(int, lo=256), default=50272, help="BPE vocabulary size to train")
    p.add_argument("--val-permille", type=_number(int, lo=0, hi=1000), default=5,
                   help="documents per 1000 held out for val")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--tokenizer-docs", type=_number(int, lo=1), default=None,
                   help="train the tokenizer on the first N train docs (default: all)")
    p.add_argument("--eval", nargs="*", default=[], help="name=path held-out sets to tokenize too; name=wikitext-detok:path detokenizes WikiText first")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.set_defaults(fn=cmd_prepare)

    _add_download_parser(sub)

    p = sub.add_parser("train", help="train a preset on prepared data")
    p.add_argument("--preset", default="tnl-tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--data", required=True, help="a directory written by `prepare`")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoint/, final/")
    p.add_argument("--set", nargs="*", default=[],
                   help="TrainConfig fields as key=value, type-checked, e.g. max_steps=1000 lr=6e-4 compile=true")
    p.add_argument("--model", nargs="*", default=[],
                   help="ModelConfig overrides as key=value, type-checked, e.g. gate=false positional=decay")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from OUT/checkpoint; every setting must equal the checkpoint's (a difference is "
                        f"refused, naming it), except {', '.join(RESUME_MAY_CHANGE)} (tnlib.train.RESUME_MAY_CHANGE "
                        f"says why); batch_size, dtype and data are compared by what they mean: the global batch "
                        f"(the number of processes may change), the precision, and the data's tokens (the folder "
                        f"may move)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate text from a saved model")
    p.add_argument("--checkpoint", required=True,
                   help="a directory written by save_model (e.g. RUN/final) or an official TransNormerLLM one")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one inside --checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_number(int, lo=1), default=100, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=_number(float, lo=0), default=0.8, help="0 = greedy; >= 0")
    p.add_argument("--top-k", type=_number(int, lo=1, none_ok=True), default=None,
                   help="sample among the k most likely tokens (>= 1; default: no limit)")
    p.add_argument("--top-p", type=_number(float, lo=0, hi=1, lo_open=True, none_ok=True), default=0.95,
                   help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--fused", action="store_true", help="GPU: compile the CUDA-graph decode step (faster per token)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="perplexity and bits per byte of a saved model on whole held-out sets")
    p.add_argument("--checkpoint", required=True, help="a directory written by save_model (e.g. RUN/final) or an "
                                                       "official TransNormerLLM one")
    p.add_argument("--data", required=True, help="a directory written by `prepare` (its tokenizer must be the model's)")
    p.add_argument("--sets", nargs="*", default=[], help="splits to score (default: val and every eval-* split)")
    p.add_argument("--seq-len", type=_number(int, lo=1), default=2048, help="window length (tokens)")
    p.add_argument("--batch-size", type=_number(int, lo=1), default=16, help="windows per forward pass")
    p.add_argument("--max-tokens", type=_number(int, lo=1, none_ok=True), default=None,
                   help="score only the first N tokens of each set, in whole windows (default: every token)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: CHECKPOINT/evals.json)")
    p.set_defaults(fn=cmd_evaluate)

    _add_convert_parser(sub)

    p = sub.add_parser("compare", help="summary.json + curves.png of several runs")
    p.add_argument("--runs", nargs="+", required=True, help="name=RUN_DIR (or name=metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory for summary.{json,md} and curves.png")
    p.add_argument("--title", default="", help="plot and summary title")
    p.add_argument("--evals", nargs="*", default=["val"], help="held-out sets to report")
    p.add_argument("--extra", nargs="*", default=[], help="key=value added to summary.json")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("quickstart", help="tiny TNL vs Transformer on the shipped sample (CPU, minutes)")
    p.add_argument("--out", default="runs/quickstart",
                   help="where the plot and summary go (results/quickstart updates the committed example)")
    p.add_argument("--work", default="runs/quickstart", help="prepared data and the two training runs")
    p.add_argument("--steps", type=_number(int, lo=1), default=QUICKSTART_STEPS, help="training steps per model")
    p.add_argument("--threads", type=_number(int, lo=1), default=2,
                   help="CPU threads for torch (fixed, so the run is comparable across machines)")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("consolidate", help="one-file model (save_model format) from a training checkpoint, sharded or not")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint (written by train, e.g. with parallel=fsdp)")
    p.add_argument("--out", required=True, help="directory for model.safetensors + config.json (tnlib.load_model)")
    p.set_defaults(fn=cmd_consolidate)

    _add_sweep_parser(sub)
    _add_gpu_check_parser(sub)
    return ap


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd is None:  # no command: the list of commands
        ap.print_help()
        return
    try:
        a.fn(a)
    except (CommandError, FileDamaged, ValueError, OSError) as e:  # DataError is a ValueError: said plainly too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
