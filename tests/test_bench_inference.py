"""benchmarks/bench_inference.py (make bench-inference) on the CPU: its ``--dry-run`` runs the parts with
tiny models (graph decoders uncaptured, the fused kernels interpreted), ``--merge`` joins the files of
several calls, and it refuses clearly where it cannot run."""
import json
import os
import subprocess
import sys

from conftest import run_script_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_inference.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
KEYS = {"model", "decoder", "batch", "ctx", "ms_per_token", "tokens_per_s", "first_call_s", "peak_mem_gb"}


def _run(args, interpret=True, timeout=600):
    env = {**ENV, "TRITON_INTERPRET": "1" if interpret else "0"}
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def test_dry_run_parts_then_merge(tmp_path):
    a, b, m = tmp_path / "timed", tmp_path / "first", tmp_path / "merged"
    _run(["--dry-run", "--parts", "tnl,transformer", "--decoders", "eager,graph,fused-graph", "--contexts", "32",
          "--batches", "1,2", "--out", str(a)])
    _run(["--dry-run", "--parts", "first-call", "--models", "tnl-385m", "--decoders", "fused-graph", "--out", str(b),
          "--impl", "decode_pdl=true,decode_prefetch=true"])  # recorded; no PDL on a CPU, so the step runs without
    assert json.loads((b / "decode-cpu.json").read_text())["header"]["impl"] == dict(decode_pdl="true",
                                                                                    decode_prefetch="true")
    timed = json.loads((a / "decode-cpu.json").read_text())
    assert (a / "decode-cpu.png").exists() and timed["header"]["dry_run"] and timed["header"]["commit"]
    assert "bench_inference.py" in timed["header"]["command"]
    checks = timed["header"]["checks"]  # each graph decoder's greedy tokens == the eager decoder's (fp32)
    assert set(checks) == {"tnl-385m", "transformer-385m"} and set(checks["tnl-385m"]) == {"graph", "fused-graph"}
    for per_model in checks.values():
        for c in per_model.values():
            assert c["tokens_equal"] == c["of"] == 16 and c["max_rel_err"] < 1e-5, c
    rows = timed["rows"]
    want = {(mdl, d, bt, 32) for bt in (1, 2) for mdl, ds in (("tnl-385m", ("eager", "graph", "fused-graph")),
                                                               ("transformer-385m", ("eager", "graph"))) for d in ds}
    assert {(r["model"], r["decoder"], r["batch"], r["ctx"]) for r in rows} == want and len(rows) == len(want)
    for r in rows:
        assert KEYS <= set(r) and "error" not in r, r
        assert r["ms_per_token"] > 0 and abs(r["tokens_per_s"] - r["batch"] / r["ms_per_token"] * 1e3) < 1e-6 * r["tokens_per_s"]
        assert r["capacity"] == (256 if r["model"] == "transformer-385m" and r["decoder"] != "eager" else None)

    first = json.loads((b / "decode-cpu.json").read_text())
    assert first["rows"] == [] and len(first["header"]["first_calls"]) == 1
    rec = first["header"]["first_calls"][0]
    assert (rec["model"], rec["decoder"], rec["batch"]) == ("tnl-385m", "fused-graph", 1)
    assert rec["first_call_s"] > 0 and rec["first_call_warm_s"] > 0 and rec["first_call_process_s"] > rec["first_call_s"]

    _run(["--merge", str(a / "decode-cpu.json"), str(b / "decode-cpu.json"), "--out", str(m)], interpret=False)
    merged = json.loads((m / "decode-cpu.json").read_text())
    assert (m / "decode-cpu.png").exists() and len(merged["rows"]) == len(rows)
    for r in merged["rows"]:  # the first call joined into every row of its (model, decoder, batch)
        measured = (r["model"], r["decoder"], r["batch"]) == ("tnl-385m", "fused-graph", 1)
        assert (r["first_call_s"] == rec["first_call_s"]) if measured else r["first_call_s"] is None, r
    assert len(merged["header"]["commit"]) == 2 and merged["header"]["dry_run"]
    auto = {m: {"1": "eager", "2": "eager"} for m in ("tnl-385m", "transformer-385m")}  # decoder="auto" on a CPU
    assert timed["header"]["auto"] == merged["header"]["auto"] == auto
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "decode_report.py"), str(m / "decode-cpu.json")],
                         capture_output=True, text=True, check=True).stdout  # the report reads what the bench writes
    assert "batch 2:" in out and "crossover" not in out and "targets:" in out  # one context: no crossover


def test_fused_graph_rows_say_why_without_the_interpreter(tmp_path):
    _run(["--dry-run", "--parts", "tnl", "--decoders", "eager,fused-graph", "--contexts", "32", "--batches", "1",
          "--out", str(tmp_path)], interpret=False)
    rows = json.loads((tmp_path / "decode-cpu.json").read_text())["rows"]
    fused = [r for r in rows if r["decoder"] == "fused-graph"]
    assert len(fused) == 1 and fused[0]["error"].startswith("skipped: the fused kernels need a GPU"), fused
    assert [r["decoder"] for r in rows if "error" not in r] == ["eager"]


def test_refuses_without_a_gpu_and_bad_arguments():
    cases = ((["--out", "/nonexistent"], "needs a CUDA GPU"), (["--parts", "tnl,70b", "--dry-run"], "--parts: expected"),
             (["--models", "gpt-2", "--dry-run"], "--models: expected"),
             (["--parts", "prefill", "--prefill-lens", "64", "--dry-run"], "--prefill-lens: expected"),
             (["--impl", "decode_pdl", "--dry-run"], "is not KEY=VALUE"),
             (["--impl", "decode_pdx=true", "--dry-run"], "unknown Implementation fields"))
    # the calls in one process (each refuses before any work; a process per call was 3/4 torch imports)
    results = run_script_calls([(SCRIPT, args) for args, _ in cases], ENV, ROOT, timeout=120)
    for (args, words), r in zip(cases, results):
        assert r["returncode"] != 0 and words in r["stderr"], (args, r["stderr"][-2000:])


def test_dry_run_prefill_part(tmp_path):
    """The ``prefill`` part (issue 29 item 4): padded against packed prefill of mixed-length prompts, each packed
    row checked against the padded one first (logits, states, positions, next tokens), in its own file."""
    _run(["--dry-run", "--parts", "prefill", "--prefill-batch", "3", "--out", str(tmp_path)])
    assert not (tmp_path / "decode-cpu.json").exists() and (tmp_path / "prefill-cpu.png").exists()
    doc = json.loads((tmp_path / "prefill-cpu.json").read_text())
    head, rows = doc["header"], doc["rows"]
    assert head["dry_run"] and head["commit"] and "bench_inference.py" in head["command"] and head["part"] == "prefill"
    lengths = head["lengths"]
    assert lengths["mixed"][:2] == [4, 48] and len(lengths["mixed"]) == 3 and lengths["skewed"] == [48, 4, 4]
    assert [(r["lengths"], r["prefill"]) for r in rows] == [(n, p) for n in ("mixed", "equal", "skewed")
                                                          for p in ("padded", "packed")]
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["prepare_ms"] > 0, r
        assert r["tokens"] == sum(lengths[r["lengths"]]) and r["padded_tokens"] == 3 * max(lengths[r["lengths"]])
        if r["prefill"] == "packed":  # fp32: the same logits and states as the padded prefill
            c = r["check"]
            assert c["positions_equal"] and c["next_tokens_equal"] == c["of"] == 3, c
            assert c["logits_rel_err"] < 1e-5 and c["state_rel_err"] < 1e-5, c
    assert set(head["speedup"]) == {"mixed", "equal", "skewed"}
