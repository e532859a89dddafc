"""Kernel-level timings behind the packed token-mixer path (results/bench/packed-kernels-h200.log).

At tnl-385m's attention shape (B=16, T=2048, H=8, D=128, bf16; SHAPE=B,T,H,D to change) it times the
Lightning forward, dq and dk/dv kernels with and without the feature-map derivative epilogue, with
two chunk sizes, against the kernels of an earlier commit (OLD_REV, default 05401c5, read with
``git show``), and the q|k feature map as ATen's silu on the strided view vs our Triton pass.
Usage (GPU): OUT=DIR python3 scripts/bench_act_kernels.py
"""
import importlib.util, os, subprocess, sys, json, tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
from triton.testing import do_bench
from tnlib.ops import lightning as L
from tnlib.ops import _lightning_kernels as NEW
_old = os.path.join(tempfile.mkdtemp(), "old_kernels.py")
with open(_old, "w") as f:
    f.write(subprocess.run(["git", "show", os.environ.get("OLD_REV", "05401c5") + ":tnlib/ops/_lightning_kernels.py"],
                           capture_output=True, text=True, check=True).stdout)
spec = importlib.util.spec_from_file_location("oldk", _old)
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)

B, T, H, D = [int(x) for x in os.environ.get("SHAPE", "16,2048,8,128").split(",")]
dev, dt = os.environ.get("DEV", "cuda"), torch.bfloat16
qkv = torch.randn(B, T, 3 * H * D, device=dev).to(dt)
q, k, v = (t.unflatten(-1, (H, D)) for t in qkv.chunk(3, -1))
qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
do = torch.randn(B, T, H, D, device=dev).to(dt)
slope = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=dev)
o = torch.empty(B, T, H, D, device=dev, dtype=dt)
s3 = L._strides3
res = {}

def old_fwd(a, b, c, ch=64, bv=None, nw=4, ns=2):
    bv = bv or min(64, D)
    OLD._lightning_kernel[(D // bv, 1, B * H)](
        a, b, c, o, o, o, o, slope, T, H, T, *s3(a), *s3(b), *s3(c), *s3(o), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        DK=D, BV=bv, CH=ch, HAS_INIT=False, INIT_DECAY=True, HAS_LOCAL=False, STORE_FINAL=False, REVERSE=False,
        DOT_PREC="tf32", UPCAST=False, num_warps=nw, num_stages=ns)

def new_fwd(a, b, c, grad_act=0, pre=None, ch=64, bv=None, nw=4, ns=2, fast=True):
    bv = bv or min(64, D)
    e, se = (pre, s3(pre)) if grad_act else (o, (0, 0, 0))
    NEW._lightning_kernel[(D // bv, 1, B * H)](
        a, b, c, o, o, o, o, slope, e, o, T, H, T, *s3(a), *s3(b), *s3(c), *s3(o), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, *se,
        DK=D, BV=bv, CH=ch, HAS_INIT=False, INIT_DECAY=True, HAS_LOCAL=False, STORE_FINAL=False, REVERSE=False,
        DOT_PREC="tf32", UPCAST=False, GRAD_ACT=grad_act, FAST=fast,
        num_warps=nw, num_stages=ns)

def t(name, fn):
    fn(); torch.cuda.synchronize()
    ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
    res[name] = ms
    print(f"{name:50s} {ms*1e3:8.1f} us", flush=True)

t("new fwd ch64", lambda: new_fwd(q, k, v))
t("new fwd ch32", lambda: new_fwd(q, k, v, ch=32))
t("new dq silu grad ch64", lambda: new_fwd(do, v, k, 1, q))
t("new dq silu grad ch32", lambda: new_fwd(do, v, k, 1, q, ch=32))
t("new dq silu grad ch32 bv128 nw8", lambda: new_fwd(do, v, k, 1, q, ch=32, bv=128, nw=8))
t("new dq act0 ch32", lambda: new_fwd(do, v, k, ch=32))
from tnlib.ops.lightning import _feature_map
t("F.silu on q|k (strided)", lambda: torch.nn.functional.silu(qkv[..., : 2 * H * D]))
t("triton feature map q|k", lambda: _feature_map(qkv[..., : 2 * H * D], 1))
dk = torch.empty_like(kc); dv = torch.empty_like(vc)
def old_dkdv(ch=64, nw=8, ns=2):
    OLD._dkdv_kernel[(1, 1, B * H)](q, k, v, do, dk, dv, o, o, o, slope, T, H, T,
        *s3(q), *s3(k), *s3(v), *s3(do), *s3(dk), *s3(dv), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        DK=D, DV=D, CH=ch, HAS_INIT=False, HAS_LOCAL=False, STORE_FINAL=False, DOT_PREC="tf32", UPCAST=False,
        num_warps=nw, num_stages=ns)
def new_dkdv(act=0, ch=64, nw=8, ns=2, fast=True):
    se = s3(k) if act else (0, 0, 0)
    NEW._dkdv_kernel[(1, 1, B * H)](q, k, v, do, dk, dv, o, o, o, slope, k, o, T, H, T,
        *s3(q), *s3(k), *s3(v), *s3(do), *s3(dk), *s3(dv), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, *se,
        DK=D, DV=D, CH=ch, HAS_INIT=False, HAS_LOCAL=False, STORE_FINAL=False, DOT_PREC="tf32", UPCAST=False,
        GRAD_ACT=act, FAST=fast, num_warps=nw, num_stages=ns)
t("old dkdv", old_dkdv)
t("new dkdv act0", new_dkdv)
t("new dkdv silu grad fast", lambda: new_dkdv(1))
t("new dkdv silu grad ns1", lambda: new_dkdv(1, ns=1))
t("new dkdv silu grad ch32", lambda: new_dkdv(1, ch=32))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "act_bench.json"), "w"), indent=1)
