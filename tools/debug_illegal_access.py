"""GPU triage of an illegal memory access: run each Lightning case in its own process (a CUDA fault
poisons the context) with CUDA_LAUNCH_BLOCKING=1, so the failing launch is the one reported. Each case
sets the forward's state update (value-scaled or not) and optionally its tile (chunk, BV, warps, stages).

  PYTHONPATH=$PWD python3 tools/debug_illegal_access.py [--sanitize]
"""
import json, os, subprocess, sys, shutil

CASE = r'''
import dataclasses, sys, json, torch
from tnlib.ops import lightning as L
B, T, H, K, V, what, scale_c, tile = json.loads(sys.argv[1])
cfg = L.launch_config(B, T, H, K, V, torch.bfloat16)
fwd = L.Tile(*tile) if tile else cfg.forward
cfg = dataclasses.replace(cfg, forward=dataclasses.replace(fwd, scale_value=scale_c))
g = torch.Generator(device="cuda").manual_seed(0)
q = (torch.randn(B, T, H, K, device="cuda", generator=g) / K**0.5).bfloat16().requires_grad_()
k = (torch.randn(B, T, H, K, device="cuda", generator=g) / K**0.5).bfloat16().requires_grad_()
v = torch.randn(B, T, H, V, device="cuda", generator=g).bfloat16().requires_grad_()
s = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda")
if what == "fwd":
    with torch.no_grad():
        o = L.lightning_attention(q, k, v, s, config=cfg)
else:
    o = L.lightning_attention(q, k, v, s, config=cfg)
    o.backward(torch.randn_like(o))
torch.cuda.synchronize()
# check against the chunked reference on one batch row
from tnlib.ops.reference import linear_attention_chunked as ref
r = ref(q[:1].double(), k[:1].double(), v[:1].double(), s.double())
err = ((o[:1].double() - r).abs().max() / r.abs().max()).item()
print("OK rel_err", round(err, 5), "seg", cfg.seg_len)
'''


def run(case, env_extra=None, prefix=()):
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", **(env_extra or {}))
    p = subprocess.run([*prefix, sys.executable, "-c", CASE, json.dumps(case)], capture_output=True, text=True,
                       env=env, timeout=240)
    out = (p.stdout + p.stderr).strip().splitlines()
    key = [l for l in out if "OK" in l or "Error" in l or "error" in l or "File \"/work" in l or "kernel" in l.lower()]
    return p.returncode, key[-12:]


if __name__ == "__main__":
    cases = [
        (64, 1024, 8, 256, 128, "fwd", True, None),
        (64, 1024, 8, 256, 128, "fwd", False, None),
        (16, 2048, 8, 256, 128, "fwd", True, None),
        (8, 1024, 8, 256, 128, "fwd", True, None),
        (32, 1024, 8, 256, 128, "fwd", True, None),
        (64, 1024, 8, 256, 128, "fwd", True, [64, 32, 4, 2]),
        (64, 1024, 8, 256, 128, "fwd", True, [32, 32, 4, 1]),
        (64, 1024, 8, 256, 128, "fwdbwd", False, None),
        (16, 2048, 8, 256, 128, "fwdbwd", True, None),
        (64, 1024, 16, 128, 128, "fwdbwd", True, None),
    ]
    res = []
    for c in cases:
        try:
            rc, lines = run(c)
        except subprocess.TimeoutExpired:
            rc, lines = -1, ["timeout"]
        print(c, "rc", rc, *lines, sep="\n  ", flush=True)
        res.append(dict(case=c, rc=rc, lines=lines))
    san = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if "--sanitize" in sys.argv and san:
        bad = next((r["case"] for r in res if r["rc"] != 0), None)
        if bad is not None:
            small = list(bad); small[0] = min(small[0], 8)
            try:
                rc, lines = run(small, prefix=(san, "--print-limit", "3"))
            except subprocess.TimeoutExpired:
                rc, lines = -1, ["timeout"]
            print("sanitizer", small, rc, *lines, sep="\n  ", flush=True)
    print("compute-sanitizer:", san)
    out = os.environ.get("OUT")
    if out:
        json.dump(res, open(os.path.join(out, "debug-illegal.json"), "w"), indent=1)
