"""The open corpus and its eval sets from the Hugging Face hub, for a machine without the local copy.

``make data`` prepares the local corpus (``../shared/data`` by default). Where there is none it first runs
``python -m tnlib download``, which writes the same kind of files from public datasets on the hub, and
then prepares them the same way: same tokenizer file, same by-document val split, same eval sets.
``download_open_data(out_dir)`` writes::

    corpus-gutenberg-hub.txt.xz   English Project Gutenberg books (``manu/project_gutenberg``, split ``en``),
                                  streamed in the dataset's order until ``corpus_bytes`` of book text
    gutenberg-heldout.txt.xz      the books of that stream whose id hashes into the held-out share
                                  (``heldout_permille``); never in the corpus file
    wikitext103-valid.txt         WikiText-103 raw validation and test (``Salesforce/wikitext``, config
    wikitext103-test.txt          ``wikitext-103-raw-v1``): one row per line, an empty row as the line " ",
                                  as in the original ``wiki.valid.raw`` / ``wiki.test.raw``
    SOURCE.json                   what was fetched: datasets, splits, revisions, books, bytes, date

The names are those of the local corpus, and so is the format: each document is followed by a line
holding only ``<|endoftext|>``. A book keeps only its text between Project Gutenberg's ``*** START OF``
and ``*** END OF`` lines; a book without them that still mentions Project Gutenberg is left out (its
licence text cannot be cut off reliably), and so is one under ``MIN_BOOK_BYTES``. Nothing else is
cleaned or deduplicated, unlike the local corpus, so the two corpora are alike but not the same text.

Every dataset is looked up on the hub (size and revision) before anything is downloaded or written; a
hub that cannot be reached raises :class:`HubUnreachable`, one line naming both ways out. Files go to
``out_dir.partial`` and are renamed to ``out_dir`` when complete, so a run cut short leaves nothing that
looks finished; a complete ``out_dir`` is reused.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import lzma
import os
import re
import shutil
from dataclasses import asdict, dataclass

from .data import EOT, SEPARATOR, DataError
from .files import _one_line, read_json

__all__ = ["HubSource", "GUTENBERG", "WIKITEXT", "download_open_data", "HubUnreachable", "MIN_BOOK_BYTES",
           "strip_gutenberg", "wikitext_raw_text", "DEFAULT_CORPUS_BYTES"]

#: book text kept by default: the size of the local corpus (942 books, 400 MB)
DEFAULT_CORPUS_BYTES = 400_000_000
#: books shorter than this after cleaning are left out (as in the local corpus)
MIN_BOOK_BYTES = 10_000


@dataclass(frozen=True)
class HubSource:
    """One split of a dataset on the Hugging Face hub; ``files`` is the path prefix of its data files in
    the dataset's repository (their sizes are shown before the download)."""

    repo: str
    config: str | None
    split: str
    files: str
    what: str


GUTENBERG = HubSource("manu/project_gutenberg", None, "en", "data/en-", "English Project Gutenberg books")
WIKITEXT = {
    "valid": HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "validation",
                       "wikitext-103-raw-v1/validation-", "WikiText-103 raw validation"),
    "test": HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "test",
                      "wikitext-103-raw-v1/test-", "WikiText-103 raw test"),
}
FILES = {"corpus": "corpus-gutenberg-hub.txt.xz", "heldout": "gutenberg-heldout.txt.xz",
         "wikitext-valid": "wikitext103-valid.txt", "wikitext-test": "wikitext103-test.txt"}


class HubUnreachable(DataError):
    """The Hugging Face hub cannot be reached (no network, or ``HF_HUB_OFFLINE`` set)."""


_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str | None:
    """A Project Gutenberg book's own text: what lies between its ``*** START OF`` and ``*** END OF``
    lines, with LF line ends, no byte-order mark and no ``<|endoftext|>`` (it would split the book). A book without those
    lines is returned whole unless it mentions Project Gutenberg (then ``None``: its licence text cannot
    be cut off reliably)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace(EOT, "").replace("\ufeff", "")
    start, end = _START.search(text), _END.search(text)
    if start and end and end.start() > start.end():
        return text[start.end():end.start()].strip("\n")
    if "project gutenberg" in text.lower():
        return None
    return text.strip("\n")


def wikitext_raw_text(rows) -> str:
    """The text of a WikiText raw file from its hub rows (one row per line; an empty row is the file's
    blank line, a single space), each line ended by a newline as in ``wiki.valid.raw``."""
    return "".join((row.rstrip("\n") or " ") + "\n" for row in rows)


def _heldout(key: str, permille: int) -> bool:
    return int(hashlib.sha1(("heldout:" + key).encode("utf-8")).hexdigest()[:8], 16) % 1000 < permille


def _reach_hint(local_corpus: str | None) -> str:
    if local_corpus:
        return (f"no corpus at CORPUS={local_corpus}, and the Hugging Face hub cannot be reached to download "
                f"an open one")
    return "the Hugging Face hub cannot be reached"


def _remedy(local_corpus: str | None) -> str:
    if local_corpus:
        return ("put the corpus there or name it with make data CORPUS=PATH (its eval sets beside it, "
                "SHARED_DATA=DIR), or allow network access to the hub (huggingface.co)")
    return ("allow network access to the hub (huggingface.co), or prepare a local corpus: "
            "python -m tnlib prepare --corpus PATH")


def _listing(src: HubSource, local_corpus: str | None) -> dict:
    """``{"revision", "files", "bytes"}`` of ``src`` on the hub, looked up without downloading data."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(src.repo, files_metadata=True, timeout=20)
    except RepositoryNotFoundError:
        raise DataError(f"the Hugging Face hub has no dataset {src.repo} (was it renamed? tnlib/download.py "
                        f"names the sources)") from None
    except Exception as e:  # no network, DNS, proxy, HF_HUB_OFFLINE: each its own exception type
        raise HubUnreachable(f"{_reach_hint(local_corpus)} ({type(e).__name__}: {_one_line(e, 120)}): "
                             f"{_remedy(local_corpus)}") from None
    files = [s for s in info.siblings or [] if s.rfilename.startswith(src.files)]
    return {"revision": info.sha, "files": len(files), "bytes": sum(s.size or 0 for s in files)}


def _rows(src: HubSource, revision: str | None, column: str = "text"):
    """The rows of ``src`` streamed from the hub (only what is read is downloaded)."""
    from datasets import load_dataset

    from .progress import quiet_datasets

    quiet_datasets()
    ds = load_dataset(src.repo, src.config, split=src.split, streaming=True, revision=revision)
    for row in ds:
        yield row


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _files(n: int) -> str:
    return f"{n} parquet file{'s' if n != 1 else ''}"


def _write_books(src: HubSource, revision: str, tmp: str, corpus_bytes: int, heldout_permille: int) -> dict:
    """Stream books into the corpus and held-out files until ``corpus_bytes`` of corpus text."""
    from .progress import tqdm

    counts = {"rows_read": 0, "books": 0, "bytes": 0, "heldout_books": 0, "heldout_bytes": 0,
              "left_out_licence": 0, "left_out_short": 0}
    with lzma.open(os.path.join(tmp, FILES["corpus"]), "wt", encoding="utf-8", preset=1) as corpus, \
            lzma.open(os.path.join(tmp, FILES["heldout"]), "wt", encoding="utf-8", preset=1) as heldout, \
            tqdm(total=corpus_bytes, unit="B", unit_scale=True, desc="books", leave=False) as bar:
        for row in _rows(src, revision):
            counts["rows_read"] += 1
            text = strip_gutenberg(row.get("text") or "")
            if text is None:
                counts["left_out_licence"] += 1
                continue
            n = len(text.encode("utf-8"))
            if n < MIN_BOOK_BYTES:
                counts["left_out_short"] += 1
                continue
            key = str(row.get("id") or hashlib.sha1(text.encode("utf-8")).hexdigest())
            if _heldout(key, heldout_permille):
                heldout.write(text + SEPARATOR)
                counts["heldout_books"] += 1
                counts["heldout_bytes"] += n
                continue
            corpus.write(text + SEPARATOR)
            counts["books"] += 1
            counts["bytes"] += n
            bar.update(n)
            if counts["bytes"] >= corpus_bytes:
                break
    if not counts["books"] or not counts["heldout_books"]:
        raise DataError(f"{src.repo} (split {src.split}) gave {counts['books']} corpus and "
                        f"{counts['heldout_books']} held-out books after {counts['rows_read']} rows "
                        f"({counts['left_out_licence']} left out for their licence text, "
                        f"{counts['left_out_short']} shorter than {MIN_BOOK_BYTES:,} bytes): raise the budget")
    return counts


def _complete(out_dir: str) -> dict | None:
    """The SOURCE.json of a finished download in ``out_dir`` whose files are all there, else ``None``."""
    path = os.path.join(out_dir, "SOURCE.json")
    if not os.path.isfile(path):
        return None
    meta = read_json(path, f"download again: python -m tnlib download --out {out_dir} --force")
    return meta if all(os.path.isfile(os.path.join(out_dir, f)) for f in FILES.values()) else None


def download_open_data(out_dir: str = "data/open", corpus_bytes: int = DEFAULT_CORPUS_BYTES,
                       heldout_permille: int = 10, force: bool = False, local_corpus: str | None = None,
                       log=print) -> dict:
    """Write the open corpus and eval sets (module docstring) into ``out_dir``; returns ``{name: path}``
    for ``corpus``, ``heldout``, ``wikitext-valid`` and ``wikitext-test``.

    A complete earlier download in ``out_dir`` is reused unless ``force``. Every source is looked up on the
    hub first: if it cannot be reached, :class:`HubUnreachable` (one line; ``local_corpus``, where a local
    corpus was looked for, is named in it) is raised before anything is downloaded or written.
    """
    if corpus_bytes < 1 or not 0 < heldout_permille < 1000:
        raise DataError(f"corpus_bytes must be >= 1 and heldout_permille in 1..999, got {corpus_bytes}, "
                        f"{heldout_permille}")
    paths = {name: os.path.join(out_dir, f) for name, f in FILES.items()}
    done = None if force else _complete(out_dir)
    if done:
        log(f"{out_dir} holds the open corpus downloaded on {done.get('date', '?')} "
            f"({done['corpus']['books']:,} books, {_size(done['corpus']['bytes'])} of text; --force to fetch again)")
        return paths
    if os.path.exists(out_dir) and os.listdir(out_dir) and not force:
        raise DataError(f"{out_dir} exists but holds no finished download (no SOURCE.json): "
                        f"pass --force to replace it, or choose another --out")
    books = _listing(GUTENBERG, local_corpus)
    wikis = {k: _listing(src, local_corpus) for k, src in WIKITEXT.items()}

    shown = f"{_files(books['files'])}, {_size(books['bytes'])}" if books["files"] else "size not listed"
    log(f"downloading an open corpus from the Hugging Face hub into {out_dir}:")
    log(f"  {GUTENBERG.repo}, split {GUTENBERG.split} ({GUTENBERG.what}; the split is {shown}): streamed "
        f"in order until {_size(corpus_bytes)} of book text is kept, so only its first files are read; "
        f"{heldout_permille / 10:g}% of the books held out")
    wiki_bytes = sum(w["bytes"] for w in wikis.values())
    log(f"  {WIKITEXT['valid'].repo}, {WIKITEXT['valid'].config}, validation and test "
        f"({_files(sum(w['files'] for w in wikis.values()))}, {_size(wiki_bytes)})")

    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    counts = _write_books(GUTENBERG, books["revision"], tmp, corpus_bytes, heldout_permille)
    wiki_meta = {}
    for key, src in WIKITEXT.items():
        text = wikitext_raw_text(row.get("text") or "" for row in _rows(src, wikis[key]["revision"]))
        if not text.strip():
            raise DataError(f"{src.repo} ({src.config}, split {src.split}) holds no text")
        with open(os.path.join(tmp, FILES[f"wikitext-{key}"]), "w", encoding="utf-8") as f:
            f.write(text)
        wiki_meta[key] = {**asdict(src), "revision": wikis[key]["revision"], "lines": text.count("\n"),
                          "bytes": len(text.encode("utf-8"))}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "corpus": {**asdict(GUTENBERG), "revision": books["revision"], "corpus_bytes": corpus_bytes,
                   "heldout_permille": heldout_permille, "min_book_bytes": MIN_BOOK_BYTES, **counts},
        "wikitext": wiki_meta,
        "files": FILES,
    }
    with open(os.path.join(tmp, "SOURCE.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"wrote {out_dir}: {counts['books']:,} books ({_size(counts['bytes'])}) in the corpus, "
        f"{counts['heldout_books']:,} held out ({_size(counts['heldout_bytes'])}); WikiText-103 "
        f"{wiki_meta['valid']['lines']:,} / {wiki_meta['test']['lines']:,} lines")
    return paths
