"""Bring a result file from a device call into the repository with the commands a user would type.

A benchmark run on a lent GPU writes to the call's ``$OUT`` (e.g. ``/root/out``) and its sub-processes to
temporary folders; the provenance records those paths. This copies ``SRC`` to ``DEST_DIR`` and rewrites, in
every string of the JSON, the device's output folder as ``DEST_DIR`` (the command then writes where the file
now is), the repository root there as relative paths, and temporary folders as ``$TMPDIR``. What was
rewritten is recorded in the header under ``paths_rewritten`` (the header is the top-level ``header`` or
``provenance`` dict). The numbers are not touched (checked: the file's numbers before and after are equal).

    python tools/result_paths.py FILES_AT/plans-h100-80gb-hbm3.json --dest results/bench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil

TMP = re.compile(r"/tmp/tmp[\w.-]+")


def _numbers(x, out):
    if isinstance(x, dict):
        for v in x.values():
            _numbers(v, out)
    elif isinstance(x, list):
        for v in x:
            _numbers(v, out)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out.append(x)
    return out


def rewrite(doc, device_out: str, dest: str, device_root: str):
    """``doc`` with its strings rewritten (see the module docstring); also the rewrites made."""
    seen = set()

    def fix(s: str) -> str:
        t = s
        out, root = device_out.rstrip("/"), device_root.rstrip("/") + "/"
        if out in t:
            t = t.replace(out + "/", dest.rstrip("/") + "/").replace(out, dest)
            seen.add(f"{out} -> {dest}")
        if root in t:
            t = t.replace(root, "")
            seen.add(f"{root} -> ./")
        if TMP.search(t):
            t = TMP.sub("$TMPDIR", t)
            seen.add("/tmp/tmp* -> $TMPDIR")
        return t

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return fix(x) if isinstance(x, str) else x

    return walk(doc), sorted(seen)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="+", help="result JSON files written on the device")
    ap.add_argument("--dest", required=True, help="the repository folder they go to (e.g. results/bench)")
    ap.add_argument("--device-out", default="/root/out", help="the call's $OUT on the device")
    ap.add_argument("--device-root", default="/work/main", help="the repository's root on the device")
    ap.add_argument("--copy", nargs="*", default=[], help="other files (PNG, logs) copied unchanged")
    a = ap.parse_args(argv)
    os.makedirs(a.dest, exist_ok=True)
    for src in a.src:
        doc = json.load(open(src))
        new, seen = rewrite(doc, a.device_out, a.dest, a.device_root)
        if _numbers(new, []) != _numbers(doc, []):
            raise SystemExit(f"{src}: numbers changed by the rewrite")
        for key in ("header", "provenance"):
            if isinstance(new.get(key), dict):
                new[key]["paths_rewritten"] = seen
                break
        dest = os.path.join(a.dest, os.path.basename(src))
        with open(dest, "w") as f:
            json.dump(new, f, indent=1)
            f.write("\n")
        print(f"{dest}: {len(seen)} kinds of path rewritten")
    for src in a.copy:
        shutil.copy(src, os.path.join(a.dest, os.path.basename(src)))


if __name__ == "__main__":
    main()
