"""Test configuration.

Tests marked ``triton`` exercise Triton kernels. On a CUDA machine they run on the GPU. On a CPU
they need the Triton interpreter, which must be switched on before ``triton`` is imported, so
``make test`` runs them in a second pytest process with ``TRITON_INTERPRET=1``; the other tests run
without it (the model then uses the PyTorch fallbacks, which is much faster on a CPU).
"""
import os
import socket

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available()

if os.environ.get("PYTEST_XDIST_WORKER") and not ON_GPU:
    # pytest-xdist workers (``make test`` on a CPU runs 2 on 2 cores): torch on one thread each, so that two
    # workers do not hand many tiny ops between 4 threads on 2 cores (the subprocesses that tests start set
    # OMP_NUM_THREADS=1 themselves)
    torch.set_num_threads(1)


def free_port() -> str:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port collides when two test runs
    share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_SCRIPT_CALLS = r"""
import contextlib, io, json, os, runpy, sys, traceback
results = []
for script, args in json.loads(sys.stdin.read()):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # what `python script.py` puts first
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        sys.path.pop(0)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): Python prints it and exits with 1
        err.write(f"{code}\n")
        code = 1
    results.append(dict(returncode=code, stdout=out.getvalue(), stderr=err.getvalue()))
print("SCRIPT_CALLS " + json.dumps(results))
"""


def run_script_calls(calls, env, cwd, timeout=300):
    """Run each ``(script, args)`` of ``calls`` as ``python script *args`` would (``__main__``, the script's folder
    first on ``sys.path``, ``sys.exit``'s status and message), all in ONE fresh Python process: for calls that
    only parse arguments or refuse early, where starting a process (and importing torch) per call is most of the
    cost. Returns one ``{"returncode", "stdout", "stderr"}`` per call, in order."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SCRIPT_CALLS], input=json.dumps([[s, list(a)] for s, a in calls]),
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("SCRIPT_CALLS ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("SCRIPT_CALLS "):])


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (GPU, or CPU with TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    if ON_GPU or INTERPRET:
        return
    skip = pytest.mark.skip(reason="Triton kernel test: needs a GPU or TRITON_INTERPRET=1 (make test sets it)")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _forced_gpu_target(monkeypatch):
    """``TNLIB_TEST_TARGET=sm_86`` (GPU runs only): every launch plans as for that target, whatever the
    GPU (``benchmarks/bench_plans.py`` runs the kernel tests so on an H100/H200 with the smaller GPUs'
    plans); without the variable, nothing changes."""
    name = os.environ.get("TNLIB_TEST_TARGET")
    if not name:
        yield
        return
    from tnlib.ops import _triton, targets
    from tnlib.ops.lightning import op, plan

    forced, plan_for = targets.parse_target(name), plan.plan_for
    monkeypatch.setattr(targets, "_cuda_target", lambda index: forced)
    monkeypatch.setattr(plan, "plan_for", lambda target=None, dtype=torch.bfloat16: plan_for(target or forced, dtype))
    _triton._kernels_take.cache_clear()
    op._cached_config.cache_clear()
    yield
    _triton._kernels_take.cache_clear()
    op._cached_config.cache_clear()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (tests that draw without a generator)."""
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Every Lightning kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    from tnlib.ops.lightning import op

    monkeypatch.setattr(op, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


@pytest.fixture
def device():
    """Where kernel tests put their tensors: the GPU if present, else the CPU (interpreter)."""
    return "cuda" if ON_GPU else "cpu"
