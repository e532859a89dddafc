"""The one rule for every Triton-backed op: can a kernel take this tensor here? And the one way they launch.

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
was imported (its interpreter; how the tests run them on a machine without a GPU). On a GPU the
device decides too (``tnlib.ops.targets``): below sm_75 no kernel runs, and bf16 tensors run no
kernel on a GPU without Triton's bf16 path (sm_75: T4, RTX 20xx); those take the ops' PyTorch paths,
with a warning, once per device and dtype, that says why. Each op adds only what is its own (the
GEMV's row count, SRMSNorm leaving ``torch.compile`` to Inductor).

Every tnlib kernel launches through :func:`launch`, which requests the compile options the kernels were
tested and timed with (:data:`LAUNCH_OPTIONS`); importing tnlib changes no environment variable.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .targets import MIN_CAPABILITY, device_target

__all__ = ["KERNEL_DTYPES", "LAUNCH_OPTIONS", "interpreting", "launch", "use_triton", "kernels_take"]

#: Compile options every tnlib kernel launch requests (Triton takes them as launch keywords).
#: ``enable_fp_fusion``: fused multiply-adds, as every kernel was tested and timed (the default of every
#: Triton before 3.10, which turns it off; 3.9 warns at a compile that requests nothing). Requested per
#: launch, so the process environment (``TRITON_DEFAULT_FP_FUSION``) is left alone; Triton's
#: ``TRITON_FORCE_DISABLE_FP_FUSION`` still overrides it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

#: Input dtypes the kernels take (float64 goes to the PyTorch paths, which are exact references).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launch(kernel, grid, **args):
    """``kernel[grid](**args)`` with :data:`LAUNCH_OPTIONS`: how every tnlib kernel is launched (by keyword)."""
    return kernel[grid](**args, **LAUNCH_OPTIONS)


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU, in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: fp16/bf16/fp32 on a CUDA device whose target runs kernels
    for that dtype (``kernels_take``), or on the CPU interpreted."""
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return kernels_take(t.device.index, t.dtype)
    return t.device.type == "cpu" and interpreting()


@torch.compiler.assume_constant_result  # a property of the device: a constant in a traced graph
def kernels_take(index: int, dtype: torch.dtype) -> bool:
    """Whether the kernels run for ``dtype`` tensors on CUDA device ``index``; where not, warns once why."""
    return _kernels_take(index, dtype)


@functools.lru_cache(maxsize=None)  # one answer, and one warning, per device and dtype
def _kernels_take(index: int, dtype: torch.dtype) -> bool:
    try:
        target = device_target(torch.device("cuda", index))
    except ValueError:  # below sm_75
        major, minor = torch.cuda.get_device_capability(index)
        warnings.warn(f"tnlib: {torch.cuda.get_device_name(index)} is sm_{major}{minor}; tnlib's Triton kernels "
                      f"need sm_{MIN_CAPABILITY} or newer, so its ops run their PyTorch paths here (slower, same "
                      "results)", stacklevel=4)
        return False
    if dtype == torch.bfloat16 and not target.bf16:
        warnings.warn(f"tnlib: bf16 tensors on {target.gpus} ({target.name}), which has no bf16 tensor cores (Triton "
                      "has no bf16 path there): tnlib's ops run their PyTorch paths for them (slower). Use fp16 "
                      "(`train` picks fp16 autocast with a loss scaler on this GPU) or fp32 to run the kernels",
                      stacklevel=4)
        return False
    return True
