"""Spread the Gutenberg training shards over a few folders, each small enough to travel with one device
call (issue 16: the longer 385M run needs more text than one call may carry).

Shards go whole, in order, while they fit a part; a shard that does not fit is cut at a document
boundary, its first piece (re-compressed, ``corpus-gutenberg-NNa.txt.xz``) filling the part and the rest
(``NNb``, ...) going on in the next. File names sort in document order, so `tnlib prepare` over all the
files sees exactly the documents of the whole shards in their order (the same by-document val split).
The first part also takes the evaluation files (Gutenberg held-out books as is, WikiText-103 raw
valid/test xz-compressed). Writes ``OUT-1/``, ``OUT-2/``, ... each with its files, ``NPARTS`` and
``SHA256SUMS``, and ``OUT-parts.json`` (what went where, and what was left out).

    python tools/long_385m_carry.py --shards ../shared/data/corpus-gutenberg-0[0-6].txt.xz \
        --heldout ../shared/data/gutenberg-heldout.txt.xz \
        --wikitext ../shared/data/wikitext103-valid.txt ../shared/data/wikitext103-test.txt \
        --parts 3 --max-bytes 34000000 --out .carry-long
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys

EOT_LINE = "\n<|endoftext|>\n"
BYTES_PER_TOKEN = 4.10  # the 50,272-token BPE on these shards (results/385m/data-meta.json), for the estimate


def read_docs(path):
    with lzma.open(path, "rt", encoding="utf-8") as f:
        parts = f.read().split(EOT_LINE)
    return parts[:-1] if parts and not parts[-1].strip() else parts


def xz_docs(docs) -> bytes:
    return lzma.compress("".join(d + EOT_LINE for d in docs).encode("utf-8"), preset=9)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cut(docs, room: int, ratio: float):
    """The longest document prefix whose xz fits ``room`` bytes: from an estimate (``ratio`` = xz/text
    bytes of the shard), backing off 2% at a time. Returns (n_docs, blob); (0, b"") when none fits."""
    size, j = 0, 0
    while j < len(docs) and (size + len(docs[j].encode()) + len(EOT_LINE)) * ratio < room * 0.995:
        size += len(docs[j].encode()) + len(EOT_LINE)
        j += 1
    while j > 0:
        blob = xz_docs(docs[:j])
        if len(blob) <= room:
            return j, blob
        j -= max(1, j // 50)
    return 0, b""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", nargs="+", required=True, help="corpus-gutenberg-NN.txt.xz, in order")
    ap.add_argument("--heldout", required=True, help="gutenberg-heldout.txt.xz (copied as is)")
    ap.add_argument("--wikitext", nargs="*", default=[], help="wikitext103-{valid,test}.txt (xz-compressed here)")
    ap.add_argument("--parts", type=int, default=3, help="device calls that carry data")
    ap.add_argument("--max-bytes", type=int, default=34_000_000, help="per part (64 MiB minus the working tree)")
    ap.add_argument("--out", default=".carry-long", help="prefix: OUT-1/, OUT-2/, ...")
    a = ap.parse_args(argv)

    dirs = [f"{a.out}-{k}" for k in range(1, a.parts + 1)]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    shutil.copyfile(a.heldout, os.path.join(dirs[0], "gutenberg-heldout.txt.xz"))
    for w in a.wikitext:
        with open(w, "rb") as f:
            data = lzma.compress(f.read(), preset=9)
        with open(os.path.join(dirs[0], os.path.basename(w) + ".xz"), "wb") as f:
            f.write(data)
    used = [sum(os.path.getsize(os.path.join(dirs[0], n)) for n in os.listdir(dirs[0]))] + [0] * (a.parts - 1)
    report = {"max_bytes": a.max_bytes, "files": [], "left_out": []}
    k = 0
    for shard in a.shards:
        name = os.path.basename(shard)
        stem = name.removesuffix(".txt.xz")
        if k < a.parts and used[k] + os.path.getsize(shard) <= a.max_bytes:  # whole, as is
            shutil.copyfile(shard, os.path.join(dirs[k], name))
            used[k] += os.path.getsize(shard)
            report["files"].append({"part": k + 1, "file": name, "bytes": os.path.getsize(shard), "from": name,
                                    "documents": "all", "text_bytes": None})
            continue
        docs = read_docs(shard)
        n_text = sum(len(d.encode()) + len(EOT_LINE) for d in docs)
        ratio, i, piece = os.path.getsize(shard) / n_text, 0, 0
        while i < len(docs) and k < a.parts:
            j, blob = cut(docs[i:], a.max_bytes - used[k], ratio)
            if j:
                fname = f"{stem}{chr(ord('a') + piece)}.txt.xz"
                with open(os.path.join(dirs[k], fname), "wb") as f:
                    f.write(blob)
                used[k] += len(blob)
                report["files"].append({"part": k + 1, "file": fname, "bytes": len(blob), "from": name,
                                        "documents": [i, i + j], "text_bytes": sum(len(d.encode()) for d in docs[i:i + j])})
                print(f"{fname}: documents {i}..{i + j - 1} of {name}, {len(blob):,} bytes", file=sys.stderr)
                i, piece = i + j, piece + 1
            if i < len(docs):
                k += 1  # this part is full
        if i < len(docs):
            report["left_out"].append({"from": name, "documents": [i, len(docs)]})
    n = sum(1 for d in dirs if any(f.startswith("corpus-") for f in os.listdir(d)))
    for d in dirs[:n]:
        with open(os.path.join(d, "NPARTS"), "w") as f:  # how many parts the device waits for
            f.write(f"{n}\n")
        with open(os.path.join(d, "SHA256SUMS"), "w") as f:
            for fname in sorted(os.listdir(d)):
                if fname != "SHA256SUMS":
                    f.write(f"{sha256(os.path.join(d, fname))}  {fname}\n")
    for d in dirs[n:]:
        shutil.rmtree(d)
    report["parts"] = {os.path.basename(d): sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                       for d in dirs[:n]}
    # training tokens, estimated from the text: whole shards' text sizes are read back once here
    text = 0
    for f in report["files"]:
        if f["text_bytes"] is None:
            with lzma.open(os.path.join(dirs[f["part"] - 1], f["file"]), "rb") as fh:
                f["text_bytes"] = sum(len(b) for b in iter(lambda: fh.read(1 << 24), b""))
        text += f["text_bytes"]
    report["text_bytes"] = text
    report["train_tokens_estimate"] = int(text / BYTES_PER_TOKEN * 0.99)  # 1% of documents go to val
    with open(f"{a.out}-parts.json", "w") as f:
        json.dump(report, f, indent=1)
    for d, size in report["parts"].items():
        print(f"{d}: {size:,} bytes: {' '.join(sorted(os.listdir(os.path.join(os.path.dirname(a.out) or '.', d))))}")
    print(f"~{report['train_tokens_estimate'] / 1e6:.1f}M training tokens; left out: {report['left_out'] or 'nothing'}")


if __name__ == "__main__":
    main()
