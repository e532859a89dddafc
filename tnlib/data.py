"""Open-corpus data pipeline: read documents, train a byte-level BPE, write flat uint16 token files.

Taught in ``notebooks/09_train_385m.ipynb``. ``prepare_data`` turns a corpus (local ``.txt``,
``.txt.xz``, ``.jsonl``, ``.parquet`` files, a directory of them, or a hub dataset id when online)
into ``out_dir/``::

    tokenizer.json      byte-level BPE (``<|endoftext|>`` is token 0 and ends every document)
    train.bin, val.bin  flat uint16 tokens (nanoGPT style, read with np.memmap)
    eval-<name>.bin     optional extra held-out sets (same tokenizer)
    meta.json           token and byte counts, tokenizer hash, source file hashes, split rule

Documents inside a text file are separated by a line holding only ``<|endoftext|>`` (the local corpus
in ``../shared/data``, and the open one ``tnlib.download`` writes); a text file without that line is one
document. The train/val split is by
document, decided by a hash of the document's text, so it does not depend on file order.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from .files import FileDamaged, _one_line, read_json
from .provenance import provenance

__all__ = ["EOT", "read_documents", "train_tokenizer", "load_tokenizer", "tokenizer_hash", "prepare_data",
           "TokenFile", "DataError", "FileDamaged", "token_byte_lengths", "wikitext_detokenize", "EVAL_TRANSFORMS"]

EOT = "<|endoftext|>"
SEPARATOR = "\n" + EOT + "\n"
TEXT_EXTS = (".txt", ".txt.xz", ".txt.gz", ".txt.bz2")
TABLE_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input to the data pipeline (missing/empty/invalid files, mismatched tokenizer, ...)."""


def _expand(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                           if f.endswith(TEXT_EXTS) or f.endswith(tuple(TABLE_EXTS)))
            if not found:
                raise DataError(f"directory {p} holds no .txt/.txt.xz/.jsonl/.parquet files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        elif any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p))
            if not matched:
                raise DataError(f"no files match {p}")
            files += matched
        else:
            raise DataError(f"corpus file {p} does not exist")
    return files


def _file_kind(path: str) -> str:
    for ext, kind in TABLE_EXTS.items():
        if path.endswith(ext):
            return kind
    if path.endswith(TEXT_EXTS):
        return "text"
    raise DataError(f"{path}: unsupported file type (use .txt, .txt.xz, .jsonl or .parquet)")


def _read_text_file(f: str) -> str:
    """Plain or compressed text without ``datasets`` (for machines that lack it, e.g. a GPU box)."""
    import bz2
    import gzip
    import lzma

    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(f)[1], open)
    try:
        with opener(f, "rt", encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{f} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e


def read_documents(paths, text_column: str = "text") -> list[str]:
    """All documents of a corpus, in file order, read through ``datasets.load_dataset``.

    ``paths``: files, directories, globs, or ``"hub:<dataset id>"`` (needs internet). Without the
    ``datasets`` package, text files are still read directly (tables and hub ids need it).
    """
    try:
        from datasets import load_dataset

        from .progress import quiet_datasets

        quiet_datasets()  # no "Generating train split" bars for files that load in a second
    except ImportError:
        load_dataset = None

    if isinstance(paths, str) and paths.startswith("hub:"):
        if load_dataset is None:
            raise DataError("reading a hub dataset needs the `datasets` package")
        ds = load_dataset(paths[4:], split="train")
        return [t for t in ds[text_column] if t and t.strip()]
    docs: list[str] = []
    for f in _expand(paths):
        if os.path.getsize(f) == 0:
            raise DataError(f"{f} is empty")
        kind = _file_kind(f)
        try:
            if kind == "text" and load_dataset is None:
                texts = _read_text_file(f).split(SEPARATOR)
            elif kind == "text":
                ds = load_dataset("text", data_files=f, split="train", sample_by="document")
                texts = [t for row in ds["text"] for t in row.split(SEPARATOR)]
            elif load_dataset is None:
                raise DataError(f"{f}: reading {kind} files needs the `datasets` package")
            else:
                ds = load_dataset(kind, data_files=f, split="train")
                if text_column not in ds.column_names:
                    raise DataError(f"{f} has no column {text_column!r} (columns: {ds.column_names})")
                texts = list(ds[text_column])
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e
        except DataError:
            raise
        except Exception as e:  # datasets wraps decoding errors in its own exception types
            if "utf-8" in str(e).lower() or "decode" in str(e).lower() or isinstance(e.__cause__, UnicodeDecodeError):
                raise DataError(f"{f} is not valid UTF-8: re-encode it as UTF-8 ({e})") from e
            raise
        texts = [t.strip("\n") for t in texts]
        texts = [t for t in texts if t.strip() and t.strip() != EOT]
        if not texts:
            raise DataError(f"{f} holds no documents")
        docs += texts
    return docs


def train_tokenizer(docs, vocab_size: int, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size > 65535:
        raise DataError(f"vocab_size {vocab_size} does not fit uint16 token files (max 65535)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: str):
    """The ``tokenizers`` tokenizer in ``path`` (a ``tokenizer.json``, or a directory holding one). A
    missing file raises ``DataError``; one that ``tokenizers`` cannot read raises ``FileDamaged``."""
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"no tokenizer at {path}")
    remedy = "restore it from a copy (prepare writes one into each data directory), or prepare the data again"
    read_json(path, remedy)  # empty, truncated or not JSON: said plainly (tokenizers' own message does not)
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception
        raise FileDamaged(path, f"is not a tokenizers tokenizer.json ({_one_line(e)})", remedy) from None


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each of the 256 bytes is written as one printable character. Bytes
    that are printable Latin-1 characters stand for themselves; the others (controls, space, a few
    Latin-1 gaps) take the characters from U+0100 on, in byte order."""
    own = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        | set(range(ord("\u00ae"), ord("\u00ff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in own:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_byte_lengths(tok) -> np.ndarray:
    """``lengths[id]``: the number of UTF-8 bytes token ``id`` of a byte-level BPE stands for (0 for
    special tokens such as ``<|endoftext|>``, which are not text). Summed over a token file this gives
    the bytes of exactly the text those tokens encode, so bits per byte need no pro-rating."""
    alphabet = _byte_alphabet()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        if piece in special:
            continue
        if any(ch not in alphabet for ch in piece):
            raise DataError(f"token {i} ({piece!r}) is not in the byte-level alphabet: "
                            "bits per byte need a byte-level BPE tokenizer")
        lengths[i] = len(piece)
    return lengths


# -- WikiText-103 detokenization --------------------------------------------------------------------------
# The raw WikiText files keep the tokenised form of the articles: every token between spaces, numbers
# split as "1 @,@ 000", clitics split off ("it 's", "don 't"), headings as "= = Title = =". Models trained
# on ordinary text are then scored partly on that format; the detokenized set scores the text itself.
_WT_RULES = (
    (re.compile(r" @([-,.])@(?: |$)"), r"\1"),                            # 1 @,@ 000 -> 1,000; well @-@ known
    (re.compile(r" ('(?:s|m|d|ve|re|ll)\b)"), r"\1"),                     # it 's -> it's
    (re.compile(r"n 't\b"), "n't"),                                        # don 't -> don't
    (re.compile(r"(?<=s) '(?= |$)"), "'"),                                  # the players ' -> the players'
    (re.compile(r" ([,.;:!?]+)(?=\s|$)"), r"\1"),                          # word , word -> word, word
    (re.compile(r"\( ?([^()]*?) ?\)"), r"(\1)"),                           # ( 24 in ) -> (24 in)
    (re.compile(r"\[ ?([^\[\]]*?) ?\]"), r"[\1]"),
    (re.compile(r'" ?([^"]*?) ?"'), r'"\1"'),                               # " lobster red " -> "lobster red"
    (re.compile(r"(?<==) (?==)"), ""),                                      # = = Title = = -> == Title ==
)


def wikitext_detokenize(text: str) -> str:
    """WikiText-103 raw text -> ordinary text: number separators joined (``@-@``, ``@,@``, ``@.@``), no
    space before punctuation or clitics (``'s``, ``n't``, ...), none inside brackets and double quotes,
    headings ``== Title ==``, and each line's leading and trailing space removed (a blank line ``" "``
    becomes empty). Applied line by line, so brackets and quotes never pair across paragraphs. Single
    quotes are left alone: they cannot be told apart from apostrophes (``K 'awiil``)."""
    out = []
    for line in text.split("\n"):
        line = line.strip(" ")
        for pattern, repl in _WT_RULES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out)


#: transforms an eval set can name as ``TRANSFORM:path`` (``prepare --eval NAME=TRANSFORM:PATH``)
EVAL_TRANSFORMS = {"wikitext-detok": wikitext_detokenize}


def _split_transform(spec) -> tuple[str | None, str]:
    """``"wikitext-detok:path"`` -> ``("wikitext-detok", "path")``; a plain path -> ``(None, path)``."""
    head, sep, rest = str(spec).partition(":")
    return (head, rest) if sep and head in EVAL_TRANSFORMS else (None, str(spec))


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_val(doc: str, val_permille: int) -> bool:
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) % 1000 < val_permille


def _encode_to_file(tok, docs, path: str, desc: str, batch: int = 64) -> tuple[int, int]:
    """Tokenize documents (multi-threaded in batches, tqdm bar) and append ``EOT`` after each."""
    from .progress import tqdm

    eot = tok.token_to_id(EOT)
    n_tokens = n_bytes = 0
    with open(path, "wb") as f:
        for i in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False):
            chunk = docs[i : i + batch]
            for enc, d in zip(tok.encode_batch(chunk), chunk):
                ids = np.asarray(enc.ids + [eot], dtype=np.uint16)
                f.write(ids.tobytes())
                n_tokens += len(ids)
                n_bytes += len(d.encode("utf-8"))
    return n_tokens, n_bytes


def prepare_data(corpus, out_dir: str, vocab_size: int = 50272, val_permille: int = 5, eval_sets: dict | None = None,
                 tokenizer: str | None = None, tokenizer_docs: int | None = None, force: bool = False) -> dict:
    """Read ``corpus``, split by document, train (or reuse) a tokenizer, write token files + meta.json.

    ``eval_sets``: ``{"name": path}`` of extra held-out text to tokenize with the same tokenizer; a path
    written ``TRANSFORM:path`` is read through ``EVAL_TRANSFORMS[TRANSFORM]`` first (e.g.
    ``"wikitext-detok:wikitext103-valid.txt"``), recorded as ``transform`` in meta.json.
    ``tokenizer``: an existing ``tokenizer.json`` to reuse instead of training one.
    Refuses to overwrite an existing ``out_dir`` unless ``force``.
    """
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not force:
            raise DataError(f"{out_dir} exists and is not empty; pass force=True (--force) to overwrite it")
        shutil.rmtree(out_dir)
    files = _expand(corpus) if not (isinstance(corpus, str) and corpus.startswith("hub:")) else []
    docs = read_documents(corpus)
    train_docs = [d for d in docs if not _is_val(d, val_permille)]
    val_docs = [d for d in docs if _is_val(d, val_permille)]
    if not val_docs:  # tiny corpora: still hold out one document, deterministically
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]
    if not train_docs:
        raise DataError("the corpus is too small: no training documents left after the split")
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_tokenizer(train_docs[:tokenizer_docs] if tokenizer_docs else train_docs, vocab_size)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "eot_id": tok.token_to_id(EOT),
        "tokenizer_sha256": tokenizer_hash(tok),
        "dtype": "uint16",
        "split": f"by document: sha1(text) % 1000 < {val_permille} -> val",
        "sources": {f: _sha256(f) for f in files} if files else {"hub": corpus},
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "splits": {},
        "provenance": provenance(),  # command, commit, machine, versions, date of this preparation
    }
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        n_tok, n_bytes = _encode_to_file(tok, split_docs, os.path.join(tmp, f"{name}.bin"), f"tokenize {name}")
        meta["splits"][name] = {"file": f"{name}.bin", "tokens": n_tok, "bytes": n_bytes}
    for name, spec in (eval_sets or {}).items():
        transform, path = _split_transform(spec)
        ed = read_documents(path)
        if transform:
            ed = [EVAL_TRANSFORMS[transform](d) for d in ed]
        n_tok, n_bytes = _encode_to_file(tok, ed, os.path.join(tmp, f"eval-{name}.bin"), f"tokenize {name}")
        meta["splits"][f"eval-{name}"] = {"file": f"eval-{name}.bin", "tokens": n_tok, "bytes": n_bytes,
                                          "source": path, "source_sha256": _sha256(path)}
        if transform:
            meta["splits"][f"eval-{name}"]["transform"] = transform
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, out_dir)  # all or nothing: an interrupted run leaves no half-written out_dir
    return meta


def _prepare_again(data_dir: str) -> str:
    return f"prepare the data again: python -m tnlib prepare --out {data_dir} --force ..."


def _checked_meta(meta_path: str) -> dict:
    """``meta.json`` of a prepared data directory, with the fields the readers use checked: a damaged
    file raises ``FileDamaged`` naming it, instead of a KeyError later."""
    remedy = _prepare_again(os.path.dirname(meta_path) or ".")
    meta = read_json(meta_path, remedy)
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise FileDamaged(meta_path, f"vocab_size is {meta.get('vocab_size')!r}, not a positive integer", remedy)
    if not isinstance(meta.get("tokenizer_sha256"), str):
        raise FileDamaged(meta_path, "has no tokenizer_sha256 string", remedy)
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise FileDamaged(meta_path, "lists no splits (the 'splits' object is missing or empty)", remedy)
    for name, info in splits.items():
        ok = (isinstance(info, dict) and isinstance(info.get("file"), str) and info["file"]
              and os.path.basename(info["file"]) == info["file"]  # a name inside the directory, no path
              and all(isinstance(info.get(k), int) and not isinstance(info[k], bool) and info[k] >= 0
                      for k in ("tokens", "bytes")))
        if not ok:
            raise FileDamaged(meta_path, f"split {name!r} is {json.dumps(info)[:120]}, expected a file name and "
                                         f"counts of tokens and bytes", remedy)
    return meta


def _check_token_file(path: str, tokens: int, data_dir: str) -> None:
    """A token file must hold exactly the ``tokens`` uint16 values that meta.json lists (checked from its
    size, before it is mapped): anything else is a truncated, padded or replaced file."""
    remedy = _prepare_again(data_dir)
    if not os.path.isfile(path):
        raise FileDamaged(path, "is missing (meta.json lists it)", remedy)
    size, want = os.path.getsize(path), 2 * tokens
    if size == want:
        return
    if size == 0:
        problem = f"is empty, but meta.json says it holds {tokens:,} tokens"
    elif size % 2:
        problem = f"holds {size:,} bytes, not a whole number of uint16 tokens (meta.json: {tokens:,} tokens)"
    else:
        problem = (f"holds {size // 2:,} tokens but meta.json says {tokens:,}: "
                   f"{'truncated' if size < want else 'not the file meta.json describes'}")
    raise FileDamaged(path, problem, remedy)


@dataclass
class TokenFile:
    """A flat uint16 token file with its byte count and, when opened from a prepared directory, the byte
    length of every token id (``byte_lengths``, from the directory's tokenizer): bits per byte then count
    the bytes of exactly the tokens scored."""

    tokens: np.ndarray
    bytes: int
    byte_lengths: np.ndarray | None = None

    @classmethod
    def open(cls, data_dir: str, split: str, expect_tokenizer: str | None = None) -> "TokenFile":
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{data_dir} has no meta.json: run `python -m tnlib prepare` (make data) first")
        meta = _checked_meta(meta_path)
        if expect_tokenizer and meta["tokenizer_sha256"] != expect_tokenizer:
            raise DataError(f"{data_dir} was tokenized with tokenizer {meta['tokenizer_sha256']}, "
                            f"expected {expect_tokenizer}: re-run prepare with the same tokenizer")
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no split {split!r}; available: {sorted(meta['splits'])}")
        info = meta["splits"][split]
        path = os.path.join(data_dir, info["file"])
        _check_token_file(path, info["tokens"], data_dir)
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        tok_path = os.path.join(data_dir, "tokenizer.json")
        lengths = token_byte_lengths(load_tokenizer(tok_path)) if os.path.isfile(tok_path) else None
        return cls(tokens, info["bytes"], lengths)
