"""benchmarks/bench_parallel.py (make bench-parallel) on the CPU: its ``--dry-run`` runs every part on 2 gloo
processes with a tiny model in fp32, the same code paths the two-GPU run takes; and it refuses clearly
where it cannot run."""
import json
import os
import subprocess
import sys

from conftest import free_port, run_script_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_parallel.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}


def test_dry_run_every_part(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), SCRIPT,
           "--dry-run", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    path = tmp_path / "parallel-cpux2.json"
    assert (tmp_path / "parallel-cpux2.png").exists()
    doc = json.loads(path.read_text())
    header, rows = doc["header"], doc["rows"]
    assert header["dry_run"] and header["world"] == 2 and header["commit"] and "bench_parallel.py" in header["command"]

    checks = {r["check"]: r for r in rows if r["part"] == "correctness"}
    assert set(checks) == {"tp2 vs 1 gpu", "fsdp vs ddp, 10 losses"}, checks
    for c in checks.values():
        assert c["passed"] and "error" not in c, c
    tp = checks["tp2 vs 1 gpu"]  # fp32: TP equals one process to what fp32 achieves
    assert tp["logits_rel_err"] < 1e-5 and tp["grad_worst_rel_err"] < 1e-5 and not tp["grads_over_tolerance"], tp
    losses = checks["fsdp vs ddp, 10 losses"]
    assert len(losses["fsdp_losses"]) == 10 and losses["max_rel_diff"] < 1e-5, losses

    timed = [r for r in rows if r["part"] != "correctness"]
    assert all(r["fits"] and r["tokens_per_s"] > 0 and len(r["step_s"]) == 2 for r in timed), timed
    got = {(r["preset"], r["mode"], r["gpus"], r["seq_len"], r["checkpointing"]) for r in timed}
    want = {(p, m, 2, t, ck) for t in (32, 64) for p, m, ck in (
        ("tnl-385m", "ddp", False), ("tnl-385m", "fsdp", False), ("tnl-385m", "tp", False),
        ("tnl-1b", "ddp", False), ("tnl-1b", "fsdp", False), ("tnl-7b", "fsdp", True), ("tnl-7b", "tp+fsdp", True))}
    want |= {("tnl-385m", "fsdp", 1, 32, False), ("tnl-1b", "fsdp", 1, 32, False)}
    assert got == want and len(timed) == len(want), sorted(got ^ want)
    summary = header["summary"]
    assert summary["fsdp_scaling_tnl-385m"] > 0 and summary["fsdp_scaling_tnl-1b"] > 0, summary


def test_refuses_without_two_gpus_and_bad_parts():
    # both calls in one process: each refuses before any work (a process per call is mostly its torch import)
    r, bad = run_script_calls([(SCRIPT, ["--out", "/nonexistent"]), (SCRIPT, ["--parts", "385m,70b"])], ENV, ROOT,
                              timeout=120)
    assert r["returncode"] != 0 and "needs 2 CUDA GPUs" in r["stderr"] and "--dry-run" in r["stderr"], r["stderr"][-2000:]
    assert bad["returncode"] != 0 and "--parts: expected some of" in bad["stderr"], bad["stderr"][-2000:]
