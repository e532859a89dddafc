"""LM head + cross-entropy in row chunks (tnlib.ops.loss) against F.cross_entropy on the logits."""
import pytest
import torch
import torch.nn.functional as F

import tnlib
from tnlib.ops.loss import XentConfig, linear_cross_entropy, xent_grad_
from tnlib.testing import KERNEL_TOLERANCE, assert_close


@pytest.mark.parametrize("N,chunk", [(1, 4), (37, 10), (64, 64), (65, 8192)])
def test_matches_cross_entropy_float64(N, chunk):
    g = torch.Generator().manual_seed(N)
    h = torch.randn(N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (N,), generator=g)
    loss = linear_cross_entropy(h, W, y, chunk=chunk)
    loss.backward()
    h2, W2 = (t.detach().clone().requires_grad_() for t in (h, W))
    ref = F.cross_entropy(F.linear(h2, W2), y)
    ref.backward()
    assert_close(loss, ref, name="loss")
    assert_close(h.grad, h2.grad, name="dh")
    assert_close(W.grad, W2.grad, name="dW")
    with torch.no_grad():  # the evaluation path (no gradients computed)
        assert_close(linear_cross_entropy(h, W, y, chunk=chunk), ref, name="loss, no_grad")


def test_bf16_autocast_rounds_logits_like_f_linear():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    W = torch.randn(80, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 80, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, y, chunk=24)
        h2, W2 = (t.detach().clone().requires_grad_() for t in (h, W))
        logits = F.linear(h2, W2)
    ref = F.cross_entropy(logits.float(), y)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert_close(h.grad, h2.grad, dtype=torch.bfloat16, name="dh")
    assert_close(W.grad, W2.grad, dtype=torch.bfloat16, name="dW")
    assert h.grad.dtype == h.dtype and W.grad.dtype == W.dtype


def test_bad_inputs():
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="h \\[N, d\\] and weight"):
        linear_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be a long tensor"):
        linear_cross_entropy(h, W, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        linear_cross_entropy(h, W, torch.zeros(4, dtype=torch.long), chunk=0)


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_model_forward_with_targets(preset):
    torch.manual_seed(0)
    model = tnlib.create_model(preset, vocab_size=300).double()
    ids = torch.randint(0, 300, (2, 33))
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    ref.backward()
    assert_close(loss, ref, name="loss")
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close(fused[n], p.grad, name=n)
    with pytest.raises(ValueError, match="targets must have shape"):
        model(ids[:, :-1], ids[:, 1:-1])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_float64(dtype, device):
    """The Triton chunk op (products, loss and gradient) against float64 autograd on the same rounded
    logits; chunks of uneven size, a vocabulary that is not a power of two."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 24, dtype=torch.float64, generator=g)
    W = torch.randn(70, 24, dtype=torch.float64, generator=g) / 3
    y = torch.randint(0, 70, (37,), generator=g)
    hd, Wd = (t.to(device, dtype).requires_grad_() for t in (h, W))
    loss = linear_cross_entropy(hd, Wd, y.to(device), chunk=16)
    loss.backward()
    h2, W2 = (t.to(dtype).double().requires_grad_() for t in (h, W))
    logits = F.linear(h2, W2).to(dtype).double()  # the kernel sees logits rounded to the compute dtype
    ref = F.cross_entropy(logits, y)
    ref.backward()
    tol = KERNEL_TOLERANCE[dtype]
    assert_close(loss, ref, dtype=dtype, tol=tol, name="loss")
    assert_close(hd.grad, h2.grad, dtype=dtype, tol=tol, name="dh")
    assert_close(Wd.grad, W2.grad, dtype=dtype, tol=tol, name="dW")


@pytest.mark.triton
@pytest.mark.parametrize("config", [None, XentConfig(128, 4)], ids=["default", "block128"])
def test_xent_grad_kernel_in_place_and_bad_target(device, config):
    """The kernel with the row in one block (default) and in several blocks (online log-sum-exp)."""
    logits = torch.randn(5, 300, dtype=torch.float64)
    t = torch.tensor([0, 299, 17, 3, 300])  # the last id is out of range
    lg = logits.float().to(device)
    nll = xent_grad_(lg, t.to(device), scale=0.5, config=config)
    ref = F.cross_entropy(logits[:4], t[:4], reduction="none")
    assert_close(nll[:4], ref, tol=KERNEL_TOLERANCE[torch.float32], name="nll")
    assert torch.isnan(nll[4])
    want = 0.5 * (torch.softmax(logits[:4], -1) - F.one_hot(t[:4], 300))
    assert_close(lg[:4], want, tol=KERNEL_TOLERANCE[torch.float32], name="grad in place")
    with pytest.raises(ValueError, match="long targets"):
        xent_grad_(lg, t.int().to(device))


@pytest.mark.triton
def test_chunk_op_under_torch_compile(device):
    """The chunked loss compiles (the chunk op is opaque, with a fake implementation) and gives the
    eager loss and gradients."""
    from tnlib.ops import loss as L

    g = torch.Generator().manual_seed(5)
    h = torch.randn(40, 32, generator=g).to(device, torch.bfloat16)
    W = (torch.randn(90, 32, generator=g) / 4).to(device)
    y = torch.randint(0, 90, (40,), generator=g).to(device)
    outs = []
    for fn in (L.linear_cross_entropy, torch.compile(L.linear_cross_entropy, fullgraph=True)):
        hd, Wd = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(hd, Wd, y, chunk=16)
        loss.backward()
        outs.append((loss.detach(), hd.grad, Wd.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-4)
