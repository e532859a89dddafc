"""FSDP, tensor parallelism and sharded checkpoints on the CPU: 2 processes over gloo, a tiny model, fp32.

The 2-process parts run this file as a ``torchrun`` worker (``python -m torch.distributed.run ...
tests/test_parallel.py MODE ARGS``, the ``__main__`` block at the end).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import free_port
from tnlib.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 layers: layer 0 has LRPE (a learnable theta), both have decay; 4 heads split over 2 ranks
MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "glu_dim": 128}
VOCAB = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random tokens in the layout of ``tnlib prepare`` (fast: no tokenizer)."""
    out = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 50_000), ("val", 4_000)):
        rng.integers(1, VOCAB, n).astype(np.uint16).tofile(out / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": n, "bytes": 4 * n}
    (out / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "tokenizer_sha256": "none", "splits": splits}))
    return str(out)


def config(data, out, **kw):
    base = dict(preset="tnl-tiny", data=data, out=out, seq_len=32, batch_size=4, max_steps=5, warmup_steps=2, lr=3e-3,
                eval_every=100, eval_tokens=256, eval_sets=(), ckpt_every=100, progress=False,
                model_overrides=MODEL, grad_clip=0.1)  # low enough that every step clips (checked below)
    base.update(kw)
    return base


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r and "event" not in r}


def torchrun(mode, arg):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           os.path.join(ROOT, "tests", "test_parallel.py"), mode, arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, the default path, a global batch of 4 sequences: 5 steps."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    train(TrainConfig(**config(data, out, checkpointing=True)))
    return losses(out), losses(out, "grad_norm")


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """2 ranks x 2 sequences with parallel=fsdp (and activation checkpointing): stops after 3 steps
    (max_tokens), leaving a sharded checkpoint and final/. The same 2 processes first run the
    tensor-parallel comparison (one launch less: starting processes is most of the time here)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out, tp_json = str(tmp / "run"), str(tmp / "tp.json")
    cfg = config(data, out, batch_size=2, parallel="fsdp", checkpointing=True, max_tokens=3 * 4 * 32)
    torchrun("train", json.dumps({"cfg": cfg, "resume": False, "tp_check": tp_json}))
    return out, cfg, tp_json


def test_fsdp_matches_single_process_and_resumes_on_1_and_2_ranks(reference, fsdp_run, tmp_path):
    out, cfg, _ = fsdp_run
    assert os.path.isdir(os.path.join(out, "checkpoint", "sharded"))
    saved = losses(out)
    assert sorted(saved) == [1, 2, 3]
    # the 2-rank continuation (same spread), then 1 rank (a plain model, and a 1-rank FSDP group) from a copy
    copies = {}
    one_rank = {"one-ddp": {"parallel": "ddp"}, "one-fsdp": {"parallel": "fsdp"},  # fsdp on 1 rank: the plain model
                "one-fsdp2": {"parallel": "fsdp", "fsdp_one_rank": True}}       # FSDP2 forced onto the one rank
    for name in one_rank:
        copies[name] = str(tmp_path / name)
        shutil.copytree(out, copies[name])
    torchrun("train", json.dumps({"cfg": {**cfg, "max_tokens": None}, "resume": True}))
    for name, kw in one_rank.items():
        train(TrainConfig(**config(cfg["data"], copies[name], checkpointing=True, **kw)), resume=True)
    ref_loss, ref_norm = reference
    assert min(ref_norm.values()) > 0.1  # the clip is active on every step, so a wrong norm changes the losses
    runs = {"2 ranks": out, **copies}
    for name, run in runs.items():
        got, norm = losses(run), losses(run, "grad_norm")
        assert sorted(got) == [1, 2, 3, 4, 5], name
        for s in range(1, 6):
            assert got[s] == pytest.approx(ref_loss[s], rel=1e-5), (name, s, got[s], ref_loss[s])
            assert norm[s] == pytest.approx(ref_norm[s], rel=1e-5), (name, s, norm[s], ref_norm[s])


def test_consolidate_gives_one_file_model(fsdp_run, tmp_path):
    import tnlib
    from tnlib.__main__ import main

    out, _, _ = fsdp_run
    main(["consolidate", "--checkpoint", os.path.join(out, "checkpoint"), "--out", str(tmp_path / "one")])
    one, final = tnlib.load_model(str(tmp_path / "one")), tnlib.load_model(os.path.join(out, "final"))
    for (k, a), (k2, b) in zip(one.state_dict().items(), final.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_tensor_parallel_matches_single_process(fsdp_run):
    with open(fsdp_run[2]) as f:
        out = json.load(f)
    for case, r in out.items():
        assert r["logits"] < 1e-5, (case, r["logits"])
        assert r["loss"] < 1e-5, (case, r["loss"])
        bad = {k: v for k, v in r["grads"].items() if not v < 1e-5}
        assert not bad, (case, bad)
        assert r["canonical"], case  # the layout round trip: gathered TP weights == the original ones
        assert r["local_heads"] == 2, case


def test_bad_combinations_fail_before_any_work(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-data")  # never opened: the checks come first
    with pytest.raises(ValueError, match="must divide the number of heads"):
        train(TrainConfig(**config(missing, str(tmp_path / "a"), tensor_parallel=3)))
    with pytest.raises(ValueError, match="parallel='zero': expected one of"):  # at the config, before train()
        train(TrainConfig(**config(missing, str(tmp_path / "b"), parallel="zero")))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"world size \(3 processes\) must be a multiple of tensor_parallel=2"):
        train(TrainConfig(**config(missing, str(tmp_path / "c"), tensor_parallel=2)))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="set parallel=fsdp"):
        train(TrainConfig(**config(missing, str(tmp_path / "d"), tensor_parallel=2)))
    assert not torch.distributed.is_initialized() and not os.path.exists(tmp_path / "a")


# ---------------------------------------------------------------- the torchrun worker (2 processes)

def _tp_case(overrides, seed):
    """Logits, loss and every gradient of a TP=2 model vs the same model on one process (max relative error)."""
    import copy

    import torch.nn.functional as F

    import tnlib
    from tnlib.parallel import apply_tensor_parallel, build_mesh, canonical_state_dict, qkvu_rank_order

    torch.manual_seed(seed)
    ref = tnlib.create_model("tnl-tiny", vocab_size=VOCAB, **{**MODEL, **overrides})
    for name, p in ref.named_parameters():  # LRPE theta and norm gains away from their initial values too
        if p.dim() < 2 or name.endswith("theta"):
            p.data.add_(0.1 * torch.randn_like(p))
    model = copy.deepcopy(ref)
    apply_tensor_parallel(model, build_mesh("cpu", 2, 2)["tp"])
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(seed))
    outs = {}
    for m in (ref, model):
        logits = m(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        outs[m is model] = logits.detach(), loss.detach()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    grads = {}
    for (name, p), (name2, q) in zip(ref.named_parameters(), model.named_parameters()):
        g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        if name.endswith("qkvu_proj.weight"):  # TP stores the rows grouped per rank
            g = g[torch.argsort(qkvu_rank_order(MODEL["d_model"], g.shape[0] // MODEL["d_model"], 2))]
        grads[name] = rel(g, p.grad)
    canon = canonical_state_dict(model)  # rank 0 gets it
    same = all(torch.equal(canon[k], v) for k, v in ref.state_dict().items()) if canon else True
    return {"logits": rel(outs[True][0], outs[False][0]), "loss": rel(outs[True][1], outs[False][1]), "grads": grads,
            "canonical": same and (bool(canon) or torch.distributed.get_rank() != 0),
            "local_heads": model.layers[0].token_mixer.n_heads}


def _worker(mode, arg):
    assert mode == "train"
    a = json.loads(arg)
    torch.distributed.init_process_group("gloo")
    if a.get("tp_check"):
        res = {"default": _tp_case({}, 0), "rms+lrpe-d+1+elu": _tp_case({"norm": "rms", "positional": "lrpe-d",
                                                                          "qk_act": "1+elu"}, 1)}
        if torch.distributed.get_rank() == 0:
            with open(a["tp_check"], "w") as f:
                json.dump(res, f)
    cfg = a["cfg"]
    cfg["eval_sets"] = tuple(cfg["eval_sets"])
    train(TrainConfig(**cfg), resume=a["resume"])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
