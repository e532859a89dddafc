"""SRMSNorm: the Triton kernel (forward and backward) against the float64 reference."""
import pytest
import torch

from tnlib.nn import build_norm
from tnlib.nn.norm import RMSNorm, SRMSNorm
from tnlib.ops.srmsnorm import srms_norm, srms_norm_reference, srms_norm_triton
from tnlib.testing import KERNEL_TOLERANCE, assert_close


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 128), (7, 1000), (1, 2048)])
def test_kernel_matches_reference(shape, dtype, device):
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    y = srms_norm_triton(x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_(True)
    yr = srms_norm_reference(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yr, dtype=dtype, tol=KERNEL_TOLERANCE[dtype], name="y")
    assert_close(dx, dxr, dtype=dtype, tol=KERNEL_TOLERANCE[dtype], name="dx")


@pytest.mark.triton
def test_kernel_on_non_contiguous_input(device):
    x = torch.randn(64, 6, device=device).t()  # [6, 64], last-dim stride 6
    assert_close(srms_norm_triton(x), srms_norm_reference(x.double()), tol=KERNEL_TOLERANCE[torch.float32])


def test_reference_properties():
    x = torch.randn(4, 256, dtype=torch.float64)
    y = srms_norm_reference(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4, dtype=torch.float64), atol=1e-5)  # eps=1e-6
    assert torch.allclose(srms_norm_reference(5 * x), y, atol=1e-8)  # scale invariant
    assert torch.equal(srms_norm(x), y)  # float64 always takes the reference


def test_norm_family():
    x = torch.randn(2, 3, 16)
    assert not list(SRMSNorm(16).parameters())
    assert [p.shape for p in RMSNorm(16).parameters()] == [torch.Size([16])]
    ln = build_norm("layer", 16)
    assert isinstance(ln, torch.nn.LayerNorm) and ln(x).shape == x.shape
    with pytest.raises(ValueError, match="unknown norm"):
        build_norm("batch", 16)
    with pytest.raises(TypeError):
        srms_norm(torch.ones(3, dtype=torch.long))
