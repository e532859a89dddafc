"""The decode GEMV kernel (``tnlib.ops.gemv``) against float64 ``F.linear``, and its dispatch."""
import os

import pytest
import torch
import torch.nn.functional as F

from tnlib import create_model
from tnlib.nn import Linear
from tnlib.ops.gemv import GEMV_MAX_ROWS, gemv, gemv_supported
from tnlib.testing import KERNEL_TOLERANCE, assert_close


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("N,K", [(13, 70), (40, 33), (8, 64)])
def test_gemv_matches_linear(rows, N, K, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(rows, K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64) / K**0.5
    y = gemv(x.to(device, dtype), w.to(device, dtype))
    assert y.shape == (rows, N) and y.dtype == dtype and torch.isfinite(y).all()
    want = F.linear(x.to(dtype).double(), w.to(dtype).double())  # same rounded inputs, exact products
    assert_close(y, want, dtype=dtype, tol=KERNEL_TOLERANCE[dtype], name="y")


@pytest.mark.triton
def test_gemv_leading_dims_and_strided_input(device):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 50, device=device)
    w = torch.randn(24, 50, device=device)
    assert_close(gemv(x, w), F.linear(x.double(), w.double()), tol=KERNEL_TOLERANCE[torch.float32])
    xs = torch.randn(50, 2, device=device).t()  # [2, 50], last-dim stride 2
    assert_close(gemv(xs, w), F.linear(xs.double(), w.double()), tol=KERNEL_TOLERANCE[torch.float32])


@pytest.mark.triton
def test_tiny_model_decode_through_gemv_matches_parallel(device):
    """A whole decode traced by torch.compile (where every projection and the tied head go through the
    kernel) == the parallel forward."""
    import tnlib.ops.gemv as gemv_mod

    torch.manual_seed(0)
    m = create_model("tnl-tiny", vocab_size=101, n_layers=2).to(device).eval()
    ids = torch.randint(0, 101, (1, 12), device=device)
    step = torch.compile(m.step, backend="eager", dynamic=False)
    launches = []
    kernel = gemv_mod._gemv_kernel
    with torch.no_grad():
        full = m(ids)
        logits, cache = m.step(ids[:, :8])
        steps = [logits]
        orig_run = kernel.run
        kernel.run = lambda *a, **k: launches.append(1) or orig_run(*a, **k)
        try:
            for t in range(8, 12):
                lg, cache = step(ids[:, t: t + 1], cache)
                steps.append(lg)
        finally:
            kernel.run = orig_run
    assert len(launches) >= 4 * (2 * 5 + 1)  # 5 products per layer (q|k|v|u, o, l1, l2, l3) + the head
    assert_close(torch.cat(steps, 1), full.double(), dtype=torch.float32, tol=1e-4, name="logits")


@pytest.mark.triton
def test_dispatch_rules(device):
    """Where the kernel can run: at most GEMV_MAX_ROWS rows, one dtype, no autograd, no bias."""
    w = torch.randn(8, 16, device=device)
    x = torch.randn(1, 16, device=device)
    with torch.no_grad():
        assert gemv_supported(x, w) and gemv_supported(x.repeat(GEMV_MAX_ROWS, 1), w)
        assert not gemv_supported(x.repeat(GEMV_MAX_ROWS + 1, 1), w)  # many rows: a GEMM's job
        assert not gemv_supported(x.double(), w)  # dtype mismatch
    assert not gemv_supported(x, w.clone().requires_grad_())  # training: autograd needs F.linear
    lin = Linear(16, 8, bias=True).to(device)
    with torch.no_grad():
        traced = torch.compile(lin, backend="eager")
        assert torch.equal(traced(x), F.linear(x, lin.weight, lin.bias))  # a bias keeps F.linear


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="CPU tensors take the kernel when interpreted")
def test_cpu_keeps_f_linear():
    """On a CPU without the interpreter the kernel never applies; gemv says why it refuses."""
    lin = Linear(16, 8, bias=False)
    x = torch.randn(1, 16)
    with torch.no_grad():
        assert not gemv_supported(x, lin.weight)
        assert torch.equal(lin(x), F.linear(x, lin.weight))
    with pytest.raises(ValueError, match="gemv: needs"):
        gemv(x, lin.weight)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == {"weight"}


@pytest.mark.triton
def test_gemv_only_when_compiled_or_captured(device):
    import tnlib.nn.linear as linear

    w = torch.randn(8, 16, device=device)
    x = torch.randn(1, 16, device=device)
    with torch.no_grad():
        assert gemv_supported(x, w) and not linear.use_gemv(x, w)  # eager: cuBLAS
        seen = []
        torch.compile(lambda x: seen.append(linear.use_gemv(x, w)) or x, backend="eager")(x)
        assert seen == [True]
        off = Linear(16, 8, bias=False, gemv=False).to(device)
        assert torch.equal(torch.compile(off, backend="eager")(x), F.linear(x, off.weight))
