"""The repository stands on its own: nothing cited lies outside it, and ``make data`` works without
``../shared`` (an open corpus from the Hugging Face hub, tested here on local parquet stand-ins: CI has
no network)."""
import glob
import json
import os
import re
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data/sample/tokenizer.json")

# references to files that are not in the repository (the private spec and design notes)
OUTSIDE = re.compile(r"spec §|spec section|\.\./shared/spec|spec/transnormerllm|spec/paper_tables|DESIGN\.md", re.I)


def _checked_files():
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(ROOT, "tnlib", "**", "*.py"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    return files


def test_nothing_cites_files_outside_the_repository():
    found = []
    for path in _checked_files():
        for n, line in enumerate(open(path, encoding="utf-8"), 1):  # notebooks: sources and outputs alike
            if OUTSIDE.search(line):
                found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "cite the paper (arXiv 2307.14995) or docs/sources.md instead:\n" + "\n".join(found)


def test_docs_sources_is_linked_from_the_readme():
    assert os.path.isfile(os.path.join(ROOT, "docs", "sources.md"))
    assert "docs/sources.md" in open(os.path.join(ROOT, "README.md")).read()


# -- make data without ../shared ---------------------------------------------------------------------------

def _book(i: int, body_lines: int = 300, kind: str = "marked") -> dict:
    body = "".join(f"Book {i}, line {j}: it was a dark and stormy night, said the narrator.\n"
                   for j in range(body_lines))
    if kind == "marked":
        text = (f"The Project Gutenberg EBook of Book {i}\n\nThis eBook is for the use of anyone anywhere.\n\n"
                f"*** START OF THIS PROJECT GUTENBERG EBOOK BOOK {i} ***\n\n{body}\n"
                f"*** END OF THIS PROJECT GUTENBERG EBOOK BOOK {i} ***\n\nProject Gutenberg licence text.\n")
    elif kind == "old":  # an old header without the markers: its licence text cannot be cut off
        text = f"Project Gutenberg's Etext of Book {i}\n\n{body}\nEnd of Project Gutenberg's Etext\n"
    else:  # already without any Project Gutenberg text
        text = body
    return {"id": str(1000 + i), "text": text}


def _hub_stand_in(tmp_path, monkeypatch):
    """Local parquet files in place of the hub: ``HfApi.dataset_info`` lists them, ``datasets.load_dataset``
    streams them. Returns the rows of each split."""
    import datasets
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling

    from tnlib.download import GUTENBERG, WIKITEXT

    books = [_book(i) for i in range(60)]
    books[3]["text"] = books[3]["text"].replace("\n", "\r\n")                  # CRLF line ends
    books[5]["text"] = books[5]["text"].replace("line 7:", "line 7: <|endoftext|>")  # would split the book
    books[7] = _book(7, body_lines=20)                                         # too short after stripping
    books[9] = _book(9, kind="old")
    books[11] = _book(11, kind="plain")
    valid = ["", " = Title = \n", "", " A line , with @-@ tokens . \n", "", " = = Part = = \n", "", " More . \n"]
    test = ["", " = Other = \n", "", " Text 's here . \n"]
    splits = {GUTENBERG: books, WIKITEXT["valid"]: [{"text": t} for t in valid],
              WIKITEXT["test"]: [{"text": t} for t in test]}
    files = {}
    for n, (src, rows) in enumerate(splits.items()):
        path = str(tmp_path / f"stand-in-{n}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(path)
        files[(src.repo, src.config, src.split)] = path
    calls = []
    load = datasets.load_dataset

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, **kw):
        if (path, name, split) not in files:  # local files (prepare reads the download): the real loader
            return load(path, name, split=split, streaming=streaming, revision=revision, **kw)
        calls.append((path, name, split, streaming, revision))
        return load("parquet", data_files={"train": files[(path, name, split)]}, split="train", streaming=streaming)

    def dataset_info(self, repo_id, files_metadata=False, timeout=None, **kw):
        siblings = [RepoSibling(rfilename=src.files + "00000-of-00001.parquet",
                                size=os.path.getsize(files[(src.repo, src.config, src.split)]))
                    for src in splits if src.repo == repo_id]
        return types.SimpleNamespace(sha="f" * 40, siblings=siblings)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    return books, valid, test, calls


def test_download_writes_the_open_corpus_and_prepare_reads_it(tmp_path, monkeypatch, capsys):
    from tnlib.data import read_documents, prepare_data
    from tnlib.download import _heldout, download_open_data, strip_gutenberg

    books, valid, test, calls = _hub_stand_in(tmp_path, monkeypatch)
    out = str(tmp_path / "open")
    budget = 200_000
    paths = download_open_data(out, corpus_bytes=budget, heldout_permille=250)
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"downloading an open corpus from the Hugging Face hub into {out}:"
    assert "manu/project_gutenberg, split en" in said[1] and "1 parquet file," in said[1]
    assert "200 kB of book text" in said[1] and "25% of the books held out" in said[1]
    assert "Salesforce/wikitext, wikitext-103-raw-v1, validation and test" in said[2]
    assert all(c[3] for c in calls) and all(c[4] == "f" * 40 for c in calls)  # streamed, at the listed revision

    corpus, heldout = read_documents(paths["corpus"]), read_documents(paths["heldout"])
    kept = [(b["id"], strip_gutenberg(b["text"])) for b in books]
    kept = [(i, t) for i, t in kept if t is not None and len(t.encode()) >= 10_000]
    want_corpus, want_heldout, total = [], [], 0
    for i, t in kept:  # the stream in order, until the corpus holds the budget
        if _heldout(i, 250):
            want_heldout.append(t)
            continue
        want_corpus.append(t)
        total += len(t.encode())
        if total >= budget:
            break
    assert corpus == want_corpus and heldout == want_heldout
    assert len(corpus) + len(heldout) < len(kept)  # stopped at the budget, the rest never read
    assert heldout and not set(heldout) & set(corpus)
    assert all("Gutenberg" not in d and "\r" not in d and "<|endoftext|>" not in d for d in corpus + heldout)
    assert books[11]["text"].strip("\n") in corpus  # a book without Project Gutenberg text is kept whole
    assert open(paths["wikitext-valid"]).read() == " \n = Title = \n \n A line , with @-@ tokens . \n \n = = Part = = \n \n More . \n"
    assert open(paths["wikitext-test"]).read().count("\n") == len(test)
    meta = json.load(open(os.path.join(out, "SOURCE.json")))
    assert meta["corpus"]["books"] == len(corpus) and meta["corpus"]["heldout_books"] == len(heldout)
    assert meta["corpus"]["left_out_licence"] == 1 and meta["corpus"]["left_out_short"] == 1
    assert meta["wikitext"]["valid"]["lines"] == len(valid) and not os.path.exists(out + ".partial")

    # the same pipeline as the local corpus: prepare with the Makefile's eval sets
    evals = {"heldout": paths["heldout"], "wikitext-valid": paths["wikitext-valid"],
             "wikitext-detok-valid": "wikitext-detok:" + paths["wikitext-valid"]}
    prepared = prepare_data(os.path.join(out, "corpus-gutenberg-*.txt.xz"), str(tmp_path / "full"),
                            val_permille=100, tokenizer=TOKENIZER, eval_sets=evals)
    assert prepared["documents"]["train"] + prepared["documents"]["val"] == len(corpus)
    assert {"eval-heldout", "eval-wikitext-valid", "eval-wikitext-detok-valid"} <= set(prepared["splits"])

    # a finished download is reused without the hub
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("downloaded again"))
    assert download_open_data(out, corpus_bytes=budget) == paths
    assert "holds the open corpus downloaded on" in capsys.readouterr().out

    # make data without a local corpus: the download (reused here, offline) and then prepare on it
    if os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK):
        res = _run(["make", "-s", "-o", "setup", "data", f"CORPUS={tmp_path}/none/corpus-*.txt.xz",
                    f"OPEN_DATA={out}", f"DATA_DIR={tmp_path}/made", f"BPE_50K={TOKENIZER}"], {})
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith(f"{out} holds the open corpus downloaded on")
        made = json.load(open(tmp_path / "made" / "meta.json"))
        assert made["sources"] == prepared["sources"] and made["tokenizer_sha256"] == prepared["tokenizer_sha256"]
        assert {f"eval-{k}" for k in ("heldout", "wikitext-valid", "wikitext-test", "wikitext-detok-valid",
                                      "wikitext-detok-test")} <= set(made["splits"])


def _run(args, env_extra, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", **env_extra)  # offline, whatever the network
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_download_offline_stops_with_one_line(tmp_path):
    out = tmp_path / "open"
    res = _run([sys.executable, "-m", "tnlib", "download", "--out", str(out), "--local-corpus", "nowhere/*.txt.xz"], {})
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no corpus at CORPUS=nowhere/*.txt.xz"), res.stderr
    assert "allow network access to the hub" in lines[0] and "CORPUS=PATH" in lines[0]
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_make_data_offline_without_a_local_corpus(tmp_path):
    if not os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK):
        pytest.skip("make data runs .venv/bin/python")
    res = _run(["make", "-s", "-o", "setup", "data", f"CORPUS={tmp_path}/none/corpus-*.txt.xz",
                f"DATA_DIR={tmp_path}/full", f"OPEN_DATA={tmp_path}/open"], {})
    ours = [line for line in (res.stdout + res.stderr).splitlines() if not line.startswith("make")]
    assert res.returncode != 0 and len(ours) == 1, res.stdout + res.stderr
    assert ours[0].startswith(f"error: no corpus at CORPUS={tmp_path}/none/corpus-*.txt.xz")
    assert "allow network access to the hub" in ours[0]
    assert not (tmp_path / "open").exists() and not (tmp_path / "full").exists()


def test_prepare_checks_eval_sets_and_the_default_corpus_before_any_work(tmp_path, capsys, monkeypatch):
    import tnlib.__main__ as cli

    sample = os.path.join(ROOT, "data/sample/gutenberg-sample.txt.xz")
    monkeypatch.setattr("tnlib.data.prepare_data", lambda *a, **k: pytest.fail("prepare ran"))
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--corpus", sample, "--out", str(tmp_path / "d"), "--eval", "held=missing.txt.xz"])
    assert capsys.readouterr().err == "error: --eval held: missing.txt.xz does not exist\n"
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "none-*.txt.xz"))
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--corpus", str(tmp_path / "none-*.txt.xz"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert err.startswith("error: no corpus at") and "python -m tnlib download" in err
    assert not (tmp_path / "d").exists()
