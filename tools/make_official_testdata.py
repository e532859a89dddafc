"""Copy the official-code reference checkpoints into tests/data/official-tnl/ with a trimmed golden.json.

Source: ../shared/reference/official-tnl/{A,B} (tiny checkpoints written by the official TransNormerLLM
code and what it computes on them; see that directory's README). The tests of ``tnlib.official`` use only
these copies, so a clone without ../shared still tests the converter. Run from the repository root:
``PYTHONPATH=$PWD python tools/make_official_testdata.py``.
"""
import argparse
import hashlib
import json
import os
import shutil

DST = "tests/data/official-tnl"
SEQ_KEYS = ("name", "length", "input_ids", "logits_first_row", "logits", "row_argmax", "row_top1_margin", "loss")
GREEDY_KEYS = ("prompt_ids", "tokens", "step_logits", "step_top1_margin")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default="../shared/reference/official-tnl",
                    help="folder holding the official checkpoints A/ and B/")
    src_root = ap.parse_args().source
    for name in ("A", "B"):
        if not os.path.isfile(os.path.join(src_root, name, "golden.json")):
            raise SystemExit(f"{src_root}/{name}/golden.json not found")
    for name in ("A", "B"):
        src, dst = os.path.join(src_root, name), os.path.join(DST, name)
        os.makedirs(dst, exist_ok=True)
        g = json.load(open(os.path.join(src, "golden.json")))
        for fname, info in g["checkpoint"]["files"].items():
            shutil.copyfile(os.path.join(src, fname), os.path.join(dst, fname))
            assert hashlib.sha256(open(os.path.join(dst, fname), "rb").read()).hexdigest() == info["sha256"], fname
        trimmed = {
            "what": "trimmed copy of golden.json (the official code's float32 outputs on this checkpoint), "
                    "made by tools/make_official_testdata.py",
            "schema": g["schema"], "config_name": g["config_name"], "official_source": g["official_source"],
            "environment": g["environment"], "files": g["checkpoint"]["files"],
            "logits_note": g["logits_note"],
            "sequences": [{k: s[k] for k in SEQ_KEYS} for s in g["sequences"]],
            "greedy": {k: g["greedy"][k] for k in GREEDY_KEYS},
        }
        with open(os.path.join(dst, "golden.json"), "w") as f:
            json.dump(trimmed, f, separators=(",", ":"))
        print(name, {f: os.path.getsize(os.path.join(dst, f)) for f in sorted(os.listdir(dst))})


if __name__ == "__main__":
    main()
