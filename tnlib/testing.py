"""One relative-error helper with per-dtype tolerances, used by every test and notebook, and the
recurrent-decode loop the tests compare against the parallel forward."""
from __future__ import annotations

import torch

__all__ = ["rel_err", "TOLERANCE", "KERNEL_TOLERANCE", "assert_close", "stepwise_logits"]

#: Relative-error budget ||a - b|| / ||b|| (the RMS ratio) for a composite computation (a layer, a
#: model, paths that sum in different orders) in a given input dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
#: The same for one Triton kernel against float64 on the same (rounded) inputs, just above the worst
#: error measured in tests/ (the numbers: results/bench/NOTES-kernels.md). fp32 kernels use exact
#: fp32 dots; 16-bit ones round their tensor-core operands (scores, states) to the input dtype, and
#: one bf16 rounding alone is a 1.7e-3 RMS ratio.
KERNEL_TOLERANCE = {
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; ``inf`` if anything is NaN/inf or shapes differ."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        return float("inf")
    denom = e.norm().item()
    num = (a - e).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def assert_close(actual, expected, dtype=None, tol=None, name="tensor"):
    """Raise ``AssertionError`` unless ``rel_err(actual, expected) <= tol`` (default from the dtype)."""
    dtype = dtype or actual.dtype
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(actual, expected)
    if not err <= tol:  # also catches nan
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {tol:.1e} ({dtype})")
    return err


def stepwise_logits(model, ids, prefill: int) -> torch.Tensor:
    """Logits of ``ids`` through the recurrent path, without autograd: ``model.step`` on the first
    ``prefill`` tokens, then one token at a time with the returned cache; ``[B, T, vocab]``, to set
    beside ``model(ids)``."""
    with torch.no_grad():
        logits, cache = model.step(ids[:, :prefill])
        steps = [logits]
        for t in range(prefill, ids.shape[1]):
            lg, cache = model.step(ids[:, t : t + 1], cache)
            steps.append(lg)
    return torch.cat(steps, 1)
