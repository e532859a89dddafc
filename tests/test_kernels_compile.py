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
import importlib.util
import os
import re

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreter functions under TRITON_INTERPRET=1")
triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("kernel_launches", os.path.join(ROOT, "tools", "kernel_launches.py"))
KL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(KL)
BF, F32 = "*bf16", "*fp32"


@pytest.fixture(scope="module")
def launches():
    """tnl-385m's Lightning launches (tools/kernel_launches.py), recorded from the launchers."""
    return KL.lightning_launches()


def compile_sm90(*args, **kwargs):
    try:
        return KL.compile_variant(*args, capability=90, **kwargs)
    except (ImportError, FileNotFoundError) as e:  # a Triton build without the CUDA backend or ptxas
        pytest.skip(f"no CUDA compiler in this Triton build: {e}")


def compile_fn_sm90(fn, constexprs, ptr_types, num_warps=4, num_stages=2, int_values=None):
    from tnlib.ops._compile import compile_kernel

    try:
        return compile_kernel(fn, constexprs, ptr_types, 90, num_warps, num_stages, int_values)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"no CUDA compiler in this Triton build: {e}")


MAIN_CASES = {  # (recorded launch, constexprs changed)
    "forward": ("forward", {}),
    "forward, init + segments + final": ("prefill", {}),
    "dq pass with the SiLU derivative": ("dq", {}),
    "dq pass with the 1+elu derivative, exact sigmoid": ("dq", dict(GRAD_ACT=2, FAST=False)),
    "reverse pass (two-pass dk/dv)": ("dv", {}),
    "LRPE shape K=256": ("lrpe", {}),
}


@pytest.mark.parametrize("case", list(MAIN_CASES))
def test_lightning_kernel_compiles_for_sm90(case, launches):
    role, change = MAIN_CASES[case]
    launch = launches[role]
    # with the model's strides (aligned: the loads are vectorized and software-pipelined, as at a
    # real launch) and without any integer specialization (the general code)
    aligned = compile_sm90(launch, **change)
    compile_sm90(launch, int_values=KL.general_ints(launch.int_values), **change)
    if role in ("forward", "dq"):  # what the model runs: loads as async copies
        assert "async_copy_global_to_local" in aligned.asm["ttgir"], "the chunk loop is no longer software-pipelined"


def test_lightning_kernel_fp32_compiles_for_sm90(launches):
    launch = launches["forward"]
    ptrs = {k: F32 for k, v in launch.ptr_types.items() if v == BF}
    compile_sm90(launch, ptr_types=ptrs, num_stages=1, BV=32, CH=32, DOT_PREC="ieee", SCALE_C=False)


@pytest.mark.parametrize("extra", ["plain", "k derivative", "segments"])
def test_dkdv_kernel_compiles_for_sm90(extra, launches):
    launch = launches["dkdv"]  # with the SiLU derivative (the packed path)
    change, ptrs, ints = {}, {}, dict(launch.int_values)
    if extra != "k derivative":
        change = dict(GRAD_ACT=0, E=None, se=None)
    if extra == "segments":  # a start state G, segment states and D_0, with the prefill's state strides
        ptrs = dict(INIT=F32, LOCAL=F32, FINAL=F32)
        ints.update({n: launches["prefill"].int_values[n] for n in ("si", "sl", "sf")})
        change.update(HAS_INIT=True, HAS_LOCAL=True, STORE_FINAL=True)
    for int_values in (ints, KL.general_ints(ints)):
        compile_sm90(launch, ptr_types=ptrs, int_values=int_values, **change)


def test_small_kernels_compile_for_sm90(launches):
    from tnlib.ops import loss, srmsnorm
    from tnlib.ops.lightning import kernels as K

    compile_sm90(launches["state"], REVERSE=True)
    for act in (1, 2):
        compile_fn_sm90(K._feature_map_kernel, dict(ACT=act, BR=4, BC=1024), dict(X=BF, Y=BF))
    compile_fn_sm90(loss._xent_grad_kernel, dict(BLOCK=4096), dict(L=F32, TGT="*i64", NLL=F32, scale="fp32"),
                    num_warps=8)
    compile_fn_sm90(srmsnorm._srms_fwd_kernel, dict(BLOCK=1024), dict(X=BF, Y=BF, RSTD=F32, eps="fp32"))
    compile_fn_sm90(srmsnorm._srms_bwd_kernel, dict(BLOCK=1024), dict(X=BF, DY=BF, DX=BF, RSTD=F32))


#: What a configuration may spill (bytes per thread) in these tests: the H200-tuned fused dk/dv
#: kernel spills ~140, the T4's K=256 forward ~350 (results/gpus/NOTES.md); gpu-check's own limit is 1024.
MAX_SPILL = 512


@pytest.mark.parametrize("target", ["sm_75", "sm_86", "sm_90"])
def test_model_kernel_configurations_fit(target):
    """Every distinct configuration tnl-385m and tnl-tiny launch (training, prefill, norms, loss, decode
    GEMV, the fused decode step) on ``target``, in its training dtype, compiles and fits its shared memory with few spills."""
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
    assert {"lightning", "segment_state", "feature_map", "srms_fwd", "srms_bwd", "xent_grad", "gemv", "fused_gemv",
            "recurrent", "embed"} <= kernels
    assert s["configs"] >= 50 and s["max_shared"] <= t.smem


def test_decode_kernels_with_pdl_and_prefetch_compile_for_sm90():
    """The fused decode step's kernels as ``pdl=True`` / ``prefetch=True`` launch them (the interpreter never
    runs those paths): the grid-dependency wait and launch in every kernel, the L2 prefetches of the weight
    rows (of both weights in SGLU's pair) before the wait in the products."""
    from tnlib.ops import decode as D

    ptr = {"X": F32, "W": BF, "Y": F32, "eps": "fp32"}
    plain = dict(NORM=True, GLU_ACT=1, DOT=False, DOT_PREC="tf32", UPCAST=False, BLOCK_M=1, BLOCK_N=16, BLOCK_K=256,
                 U=None, G=None, R=None, W2=None)
    counts = {}
    for pdl, prefetch, pair in ((True, False, False), (True, True, False), (True, True, True)):
        ce = {k: v for k, v in plain.items() if not (pair and k == "W2")}  # W2 a pointer: SGLU's pair
        ptx = compile_fn_sm90(D._fused_gemv_kernel, {**ce, "GDC": pdl, "PREFETCH": prefetch, "LINE": 64},
                              {**ptr, **({"W2": BF} if pair else {})}, num_stages=3).asm["ptx"]
        counts[pair] = ptx.count("prefetch.global.L2")
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
        assert ("prefetch.global.L2" in ptx) == prefetch
        if prefetch:  # before the wait: the weights are hinted while the previous kernel still runs
            assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
    assert counts[True] > counts[False] > 0  # the pair hints both weights' rows
    ptx = compile_fn_sm90(D._fused_gemv_kernel, {**plain, "GDC": False}, ptr, num_stages=3).asm["ptx"]
    assert "griddepcontrol" not in ptx and "prefetch.global" not in ptx
    rec = compile_fn_sm90(D._recurrent_kernel, dict(D=128, BV=32, ACT=1, GDC=True, THETA=None, POS=None),
                          {"QKV": F32, "SLOPE": F32, "S": F32, "O": F32},
                          int_values=dict(H=8, sqkv=4096, ss=(131072, 16384, 128, 1), so=1024))
    emb = compile_fn_sm90(D._embed_kernel, dict(BLOCK=1024, GDC=True), {"IDS": "*i64", "E": BF, "X": F32, "scale": "fp32"})
    assert all("griddepcontrol.wait" in k.asm["ptx"] for k in (rec, emb))


@pytest.mark.parametrize("dot", [False, True])
def test_decode_product_split_k_compiles_for_sm90(dot):
    """Split-K of the in-place residual products (``GemvTile.split_k``): a K range per program, the whole-row
    norm in a loop of its own, the shares added atomically (the interpreter runs the arithmetic; this, the
    compiler's side)."""
    from tnlib.ops import decode as D

    ce = dict(NORM=True, GLU_ACT=0, DOT=dot, DOT_PREC="tf32", UPCAST=False, BLOCK_M=16 if dot else 1,
              BLOCK_N=16, BLOCK_K=64 if dot else 256, U=None, G=None, W2=None, SPLIT=4)
    k = compile_fn_sm90(D._fused_gemv_kernel, ce, {"X": F32, "W": BF, "Y": F32, "R": F32, "eps": "fp32"}, num_stages=3)
    stores = lambda ptx: set(re.findall(r"\b(red\.global[\w.]*|atom\.global[\w.]*|st\.global)", ptx))  # noqa: E731
    assert stores(k.asm["ptx"]) == {"red.global.gpu.relaxed.add.f32"}  # the shares added, nothing stored
    plain = compile_fn_sm90(D._fused_gemv_kernel, {**ce, "SPLIT": 1}, {"X": F32, "W": BF, "Y": F32, "R": F32,
                                                                      "eps": "fp32"}, num_stages=3)
    assert stores(plain.asm["ptx"]) == {"st.global"}
