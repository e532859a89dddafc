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


def free_port() -> str:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port collides when two test runs
    share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


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
