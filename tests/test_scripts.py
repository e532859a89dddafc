"""The repository's scripts: one benchmark per ``make bench-*`` target, tnlib imported as installed,
every ``--help`` runs, and the result files that notebooks and notes name exist."""
import glob
import os
import re
import subprocess
import sys

import pytest
from conftest import run_script_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
                 + glob.glob(os.path.join(ROOT, "tools", "*.sh")))


def _bench_targets():
    """``{target: script}`` for every ``bench-*`` rule of the Makefile (the script its recipe runs)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    out = {}
    for m in re.finditer(r"^(bench-[\w-]+):.*\n((?:\t.*\n)+)", text, re.M):
        scripts = re.findall(r"(\S+\.py)", m.group(2))
        out[m.group(1)] = (scripts, m.group(2))
    return out


def test_no_script_edits_sys_path():
    assert SCRIPTS
    offenders = [os.path.relpath(p, ROOT) for p in SCRIPTS if "sys.path" in open(p).read()]
    assert not offenders, f"scripts must import tnlib as installed (PYTHONPATH=$PWD), not edit sys.path: {offenders}"


def test_one_benchmark_per_make_target():
    targets = _bench_targets()
    assert {"bench-kernels", "bench-model", "bench-srmsnorm", "bench-inference"} <= set(targets)
    run = set()
    for target, (scripts, _) in targets.items():
        assert len(scripts) == 1 and scripts[0].startswith("benchmarks/"), (target, scripts)
        assert os.path.isfile(os.path.join(ROOT, scripts[0])), (target, scripts)
        run.add(os.path.basename(scripts[0]))
    have = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))}
    assert have == run, f"benchmarks without a make target: {sorted(have - run)}"


def test_bench_targets_without_setup_run_the_tree(tmp_path):
    """A ``bench-*`` target with no setup step runs where only a copy of the tree and a python with torch exist
    (a lent GPU: no install, no internet), so its recipe puts the tree first on ``PYTHONPATH``; without it the
    script stops at ``import tnlib`` (ModuleNotFoundError), or imports another checkout's tnlib. The recipe is run
    by make with a stand-in python that prints the ``PYTHONPATH`` it was given."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    text = open(os.path.join(ROOT, "Makefile")).read()
    no_setup = [t for t, deps in re.findall(r"^(bench-[\w-]+):([^#\n]*)", text, re.M) if "setup" not in deps.split()]
    assert {"bench-kernels", "bench-varlen", "bench-plans"} <= set(no_setup)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH"\n')
    (venv / "bin" / "python").chmod(0o755)
    root = os.path.realpath(ROOT)
    for target in no_setup:
        for before, want in ((None, root), ("/elsewhere", f"{root}:/elsewhere")):
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            if before:
                env["PYTHONPATH"] = before
            out = subprocess.run(["make", "-s", target, f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, (target, out.stderr)
            assert out.stdout.splitlines() == [f"PYTHONPATH={want}"], (target, out.stdout)


def test_make_bench_model_runs_the_library_defaults():
    _, recipe = _bench_targets()["bench-model"]
    for flag in ("--set", "--override", "--compile-scope", "--compile-mode", "--inductor", "tnlib."):
        assert flag not in recipe, f"make bench-model must measure the default path, not {flag}"


BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


@pytest.fixture(scope="module")
def help_outputs():
    """Every benchmark's ``--help``, all in one fresh process (one torch import instead of one per script)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return dict(zip(BENCHMARKS, run_script_calls([(s, ["--help"]) for s in BENCHMARKS], env, ROOT, timeout=120)))


@pytest.mark.parametrize("script", BENCHMARKS, ids=os.path.basename)
def test_benchmark_help_runs(script, help_outputs):
    res = help_outputs[script]
    assert res["returncode"] == 0, res["stderr"][-2000:]
    assert "--out" in res["stdout"] and "--commit" in res["stdout"]  # the shared conventions of benchmarks/common.py


def test_result_path_and_settings():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    import argparse

    from tnlib.provenance import gpu_slug

    a = argparse.Namespace(out="some/dir", commit=None)
    assert common.result_path(a, "model") == os.path.join("some/dir", f"model-{gpu_slug()}.json")
    assert common.result_path(a, "kernels", ".png").endswith(f"kernels-{gpu_slug()}.png")
    assert common.parse_settings('a=1,b="x",c=true') == {"a": 1, "b": "x", "c": True}
    assert common.parse_settings("") == {}
    with pytest.raises(SystemExit):
        common.parse_settings("residual_dtype=compute")  # a string without JSON quotes


def test_result_files_named_by_notebooks_and_notes_exist():
    pat = re.compile(r"(?<![\w/.-])(?:\.\./)?(results/(?:bench|logs|tuning|profiles)/[\w.-]+\.(?:json|txt|png|log))")
    files = glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")) + glob.glob(
        os.path.join(ROOT, "results", "**", "NOTES*.md"), recursive=True) + [os.path.join(ROOT, "README.md")]
    missing = sorted({(os.path.relpath(f, ROOT), p) for f in files for p in pat.findall(open(f).read())
                      if not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, missing


def test_bench_plans_dry_run(tmp_path):
    """The one-call GPU script of issue 31 runs every part on the CPU at tiny sizes (its code, not numbers):
    the forced-plan pytest selection collects, both trees' workers report equal Hopper configurations."""
    import json

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "benchmarks/bench_plans.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "plans-*.json"))
    rows = json.load(open(path))["rows"]
    assert {r["part"] for r in rows} == {"tests", "check", "hopper", "hopper-configs", "forced", "train"}
    assert all(r["returncode"] == 0 and "tests collected" in r["summary"] for r in rows if r["part"] == "tests")
    assert all(r["ok"] for r in rows if r["part"] == "check")
    assert [r["equal"] for r in rows if r["part"] == "hopper-configs"] == [True]
    assert {r["plan"] for r in rows if r["part"] == "train"} == {"default", "sm_80", "sm_86", "sm_75"}
    assert os.path.isfile(path[: -len(".json")] + ".png")


def test_result_paths_rewrites_device_paths_only(tmp_path):
    """tools/result_paths.py: the device's $OUT becomes the destination, the device's repository root and
    temporary folders go, every number stays; a rewrite that would change a number is refused."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("result_paths", os.path.join(ROOT, "tools", "result_paths.py"))
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    doc = {"header": {"command": "python3 benchmarks/x.py --out /root/out --before build/b",
                      "runs": [{"command": "python3 /work/main/tools/y.py --out /tmp/tmp_ab1c/before-1.json"}]},
           "rows": [{"ms": 0.25, "n": 3, "path": "/root/out/x.json"}]}
    src = tmp_path / "x.json"
    src.write_text(json.dumps(doc))
    rp.main([str(src), "--dest", str(tmp_path / "dest")])
    new = json.load(open(tmp_path / "dest" / "x.json"))
    dest = str(tmp_path / "dest")
    assert new["header"]["command"] == f"python3 benchmarks/x.py --out {dest} --before build/b"
    assert new["header"]["runs"][0]["command"] == "python3 tools/y.py --out $TMPDIR/before-1.json"
    assert new["rows"] == [{"ms": 0.25, "n": 3, "path": f"{dest}/x.json"}]
    assert len(new["header"]["paths_rewritten"]) == 3


def test_bench_varlen_dry_run(tmp_path):
    """Issue 29's benchmark (packed documents vs the dense kernel) runs on the CPU at tiny sizes under the
    interpreter: every row checked against the kernels document by document and float64, then timed once, with a
    ``PackedSequences`` made before the timed calls (``tnlib``, its build timed) and with the plain tensor."""
    import json

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    res = subprocess.run([sys.executable, "benchmarks/bench_varlen.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "varlen-*.json"))
    doc = json.load(open(path))
    head, rows = doc["header"], doc["rows"]
    assert head["dry_run"] and head["commit"] and "bench_varlen.py" in head["command"]
    assert sum(head["mixed_lengths"]) == head["tokens"] and len(set(head["mixed_lengths"])) > 3
    assert [(r["impl"], r["name"]) for r in rows] == [("tnlib", "T=128"), ("tnlib", "T=256")] + [
        (impl, name) for name in ("mixed", "equal", "one") for impl in ("tnlib", "tnlib-tensor")]
    assert all(r["fwd_ms"] and r["fwdbwd_ms"] for r in rows)
    checked = [r["check"] for r in rows if r["impl"] == "tnlib" and r["kind"] == "varlen"]
    assert len(checked) == 3 and all(c.pop("same_as_tensor") is True and max(c.values()) <= 2e-6 for c in checked)
    assert all(r["build_ms"] > 0 for r in rows if r["impl"] == "tnlib" and r["kind"] == "varlen")
    assert len(head["summary"]) == 12 and [h["name"] for h in head["host_per_call"]] == ["mixed", "equal", "one"]
    assert os.path.isfile(path[: -len(".json")] + ".png")
