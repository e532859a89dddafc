"""The Triton kernels compile for the GPUs tnlib plans for, and fit them, on any machine, GPU or not.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic on a CPU but never runs
Triton's GPU compiler, which rejects things the interpreter accepts. These tests hand each kernel, in
the constexpr configurations tnlib launches, to ``triton.compile`` for a GPU target: frontend, MLIR
passes, PTX and ptxas, no GPU needed. The sm_90 tests below check kernel variants one by one; the
per-target test compiles every configuration the model presets launch (``tnlib.gpucheck``, what
``python -m tnlib gpu-check`` runs) for a T4 (sm_75), an RTX 30xx/A10 (sm_86) and an H100 (sm_90)
and asserts each fits. They run in the process without the interpreter (under it the kernels are
interpreter functions). Compiled kernels are cached in Triton's cache: a cold run of the per-target
test takes about two minutes on two cores, a warm one seconds.
"""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreter functions under TRITON_INTERPRET=1")
triton = pytest.importorskip("triton")

from tnlib.ops._sm90 import BF16 as BF, FP32 as F32  # noqa: E402
from tnlib.ops._sm90 import compile_sm90 as _compile  # noqa: E402
from tnlib.ops._sm90 import lightning_launch_ints  # noqa: E402

INTS = lightning_launch_ints()


def compile_sm90(fn, constexprs, ptr_types, num_warps=4, num_stages=2, int_values=None):
    try:
        return _compile(fn, constexprs, ptr_types, num_warps, num_stages, int_values)
    except (ImportError, FileNotFoundError) as e:  # a Triton build without the CUDA backend or ptxas
        pytest.skip(f"no CUDA compiler in this Triton build: {e}")


MAIN = dict(A=BF, Bp=BF, Cp=BF, O=BF, INIT=F32, LOCAL=F32, FINAL=F32, slope_ptr=F32, E=BF)
MAIN_BASE = dict(DK=128, BV=64, CH=64, HAS_INIT=False, INIT_DECAY=True, HAS_LOCAL=False, STORE_FINAL=False,
                 REVERSE=False, DOT_PREC="tf32", UPCAST=False, GRAD_ACT=0, FAST=True, SCALE_C=True)
MAIN_CASES = {
    "forward": dict(),
    "forward, init + segments + final": dict(HAS_INIT=True, HAS_LOCAL=True, STORE_FINAL=True),
    "dq pass with the SiLU derivative": dict(GRAD_ACT=1),
    "dq pass with the 1+elu derivative, exact sigmoid": dict(GRAD_ACT=2, FAST=False),
    "reverse pass (two-pass dk/dv)": dict(REVERSE=True, INIT_DECAY=False, HAS_INIT=True, STORE_FINAL=True),
    "LRPE shape K=256": dict(DK=256, BV=32, SCALE_C=False),
}


@pytest.mark.parametrize("case", list(MAIN_CASES))
def test_lightning_kernel_compiles_for_sm90(case):
    from tnlib.ops.lightning import kernels as K

    # with the model's strides (aligned: the loads are vectorized and software-pipelined, as at a
    # real launch) and without any integer specialization (the general code)
    ints = INTS["dq"] if MAIN_CASES[case].get("GRAD_ACT") else INTS["forward"]
    aligned = compile_sm90(K._lightning_kernel, {**MAIN_BASE, **MAIN_CASES[case]}, MAIN, int_values=ints)
    compile_sm90(K._lightning_kernel, {**MAIN_BASE, **MAIN_CASES[case]}, MAIN)
    if case in ("forward", "dq pass with the SiLU derivative"):  # what the model runs: loads as async copies
        assert "async_copy_global_to_local" in aligned.asm["ttgir"], "the chunk loop is no longer software-pipelined"


def test_lightning_kernel_fp32_compiles_for_sm90():
    from tnlib.ops.lightning import kernels as K

    ptrs = {k: (F32 if v == BF else v) for k, v in MAIN.items()}
    compile_sm90(K._lightning_kernel, {**MAIN_BASE, "BV": 32, "CH": 32, "DOT_PREC": "ieee", "SCALE_C": False}, ptrs,
                 num_stages=1)


@pytest.mark.parametrize("extra", [dict(), dict(GRAD_ACT=1), dict(HAS_LOCAL=True, HAS_INIT=True, STORE_FINAL=True)],
                         ids=["plain", "k derivative", "segments"])
def test_dkdv_kernel_compiles_for_sm90(extra):
    from tnlib.ops.lightning import kernels as K

    ptrs = dict(Q=BF, K=BF, V=BF, DO=BF, DK_out=BF, DV_out=BF, INIT=F32, LOCAL=F32, FINAL=F32, slope_ptr=F32, E=BF)
    base = dict(DK=128, DV=128, CH=64, HAS_INIT=False, HAS_LOCAL=False, STORE_FINAL=False, DOT_PREC="tf32",
                UPCAST=False, GRAD_ACT=0, FAST=True)
    for int_values in (INTS["dkdv"], None):
        compile_sm90(K._dkdv_kernel, {**base, **extra}, ptrs, num_warps=8, int_values=int_values)


def test_small_kernels_compile_for_sm90():
    from tnlib.ops import loss, srmsnorm
    from tnlib.ops.lightning import kernels as K

    compile_sm90(K._segment_state_kernel, dict(DK=128, BV=128, CH=64, REVERSE=True, DOT_PREC="tf32", UPCAST=False),
                 dict(Bp=BF, Cp=BF, slope_ptr=F32, LOCAL=F32), num_warps=8)
    for act in (1, 2):
        compile_sm90(K._feature_map_kernel, dict(ACT=act, BR=4, BC=1024), dict(X=BF, Y=BF))
    compile_sm90(loss._xent_grad_kernel, dict(BLOCK=4096), dict(L=F32, TGT="*i64", NLL=F32, scale="fp32"), num_warps=8)
    compile_sm90(srmsnorm._srms_fwd_kernel, dict(BLOCK=1024), dict(X=BF, Y=BF, RSTD=F32, eps="fp32"))
    compile_sm90(srmsnorm._srms_bwd_kernel, dict(BLOCK=1024), dict(X=BF, DY=BF, DX=BF, RSTD=F32))


#: What a configuration may spill (bytes per thread) in these tests: the H200-tuned fused dk/dv
#: kernel spills ~140, the T4's K=256 forward ~350 (results/gpus/NOTES.md); gpu-check's own limit is 1024.
MAX_SPILL = 512


@pytest.mark.parametrize("target", ["sm_75", "sm_86", "sm_90"])
def test_model_kernel_configurations_fit(target):
    """Every distinct configuration tnl-385m and tnl-tiny launch (training, prefill, norms, loss, decode
    GEMV) on ``target``, in its training dtype, compiles and fits its shared memory with few spills."""
    import io

    from tnlib.gpucheck import check_target
    from tnlib.ops.targets import parse_target

    t = parse_target(target)
    s = check_target(t, ["tnl-385m", "tnl-tiny"], max_spill=MAX_SPILL, progress=False, out=io.StringIO())
    errors = [r.get("error", "") for r in s["rows"]]
    if errors and all(e.startswith(("ImportError", "FileNotFoundError")) for e in errors):
        pytest.skip(f"no CUDA compiler in this Triton build: {errors[0]}")
    bad = [(r["kernel"], r["config"], r.get("error") or (r["shared"], r["spill_stores"])) for r in s["rows"]
           if not r["fits"]]
    assert not bad, f"{target} (limit {t.smem} B): {bad}"
    kernels = {r["kernel"] for r in s["rows"]}
    assert {"lightning", "segment_state", "feature_map", "srms_fwd", "srms_bwd", "xent_grad", "gemv"} <= kernels
    assert s["configs"] >= 50 and s["max_shared"] <= t.smem
