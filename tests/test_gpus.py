"""Launch plans per GPU target, the bf16 rule for GPUs without bf16, and the gpu-check command (no GPU).

The compile checks themselves (every configuration the model launches, compiled for sm_75, sm_86 and
sm_90) are in ``tests/test_kernels_compile.py``; here: the plan table's contracts, the Hopper rows
pinned to the H200 tuning, the device lookup and precision rules with a mocked CUDA device, and the
launches ``gpu-check`` collects.
"""
import dataclasses
import itertools
import warnings
from unittest import mock

import pytest
import torch

from tnlib.ops import _triton
from tnlib.ops.lightning.plan import LaunchConfig, Tile, launch_config, plan_for, segment_plan
from tnlib.ops.targets import TARGETS, GpuTarget, device_target, parse_target, target_for_capability

K_DIMS, V_DIMS = (16, 32, 64, 128, 256), (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHAPES = [(1, 70, 2), (16, 2048, 8), (1, 32768, 8), (2, 65536, 16), (4, 8192, 32), (1, 1000, 8)]


def _plan_94efa3b(B, T, H, DK, DV, dtype):
    """``plan.launch_config`` as of commit 94efa3b (one plan for every GPU, tuned on the H200), verbatim."""
    fp32 = dtype == torch.float32

    def generic(DK, DV):
        if fp32:
            t = Tile(32 if DK >= 128 else 64, min(DV, 32), 4, 1)
        elif DK >= 256:
            t = Tile(64, min(DV, 32), 4, 1)
        else:
            t = Tile(64, min(DV, 64), 4, 2)
        return dataclasses.replace(t, scale_value=DK <= 128 and not fp32)

    fwd = generic(DK, DV)
    # the state tile's scale_value: the segment-state kernel of 94efa3b ignored it and always scaled the value
    # tile; it reads it now, so the fp32 state tile (the forward's) says what ran: True
    state = dataclasses.replace(fwd, scale_value=True) if fp32 else Tile(64, min(DV, 128 if DK <= 128 else 64), 8, 2, True)
    dkdv = None
    if DK <= 128 and DV <= 128 and (not fp32 or DK * DV <= 64 * 64):
        dkdv = Tile(32 if fp32 else 64, DV, 8 if DK * DV >= 128 * 128 else 4, 1 if fp32 else 2)
    return LaunchConfig(seg_len=segment_plan(B, H, T, DV // fwd.block_v), forward=fwd, dq=generic(DV, DK), state=state,
                        dkdv=dkdv, dv=generic(DK, DV), dk=generic(DV, DK))


@pytest.mark.parametrize("target", [None, "sm_90"])
def test_hopper_plan_is_the_h200_tuning(target):
    """sm_90 (and the CPU interpreter) keep exactly the launches measured on the H200."""
    t = parse_target(target) if target else None
    for K, V, dtype, (B, T, H) in itertools.product(K_DIMS, V_DIMS, DTYPES, SHAPES):
        assert launch_config(B, T, H, K, V, dtype, t) == _plan_94efa3b(B, T, H, K, V, dtype), (K, V, dtype, B, T, H)


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_plans_every_supported_shape(name):
    t = TARGETS[name]
    for K, V, dtype in itertools.product(K_DIMS, V_DIMS, DTYPES):
        cfg = launch_config(4, 4096, 8, K, V, dtype, t)
        cfg.check(K, V)
        assert LaunchConfig.from_ints(cfg.to_ints()) == cfg
        for tile in (cfg.forward, cfg.dq, cfg.state, cfg.dv, cfg.dk) + ((cfg.dkdv,) if cfg.dkdv else ()):
            assert tile.chunk in (16, 32, 64) and tile.num_warps in (4, 8) and tile.num_stages in (1, 2), (name, tile)
        if cfg.dkdv is not None:  # the fused kernel holds the whole [K, V] state
            assert K <= 128 and V <= 128 and cfg.dkdv.block_v == V
        assert not (cfg.forward.scale_value and (K > 128 or dtype == torch.float32))  # faulted at K = 256 on the H200


def test_plan_rows_differ_where_the_hardware_does():
    bf = torch.bfloat16
    assert plan_for(TARGETS["sm_80"], bf) is plan_for(TARGETS["sm_86"], bf) is plan_for(TARGETS["sm_120"], bf)
    assert launch_config(16, 2048, 8, 128, 128, bf, TARGETS["sm_86"]).dkdv is None  # two passes: no spilling state
    assert launch_config(16, 2048, 8, 128, 128, bf, TARGETS["sm_90"]).dkdv is not None
    t4 = launch_config(16, 2048, 8, 256, 128, torch.float16, TARGETS["sm_75"])
    assert (t4.forward.chunk, t4.forward.block_v) == (16, 16)


def test_parse_target_and_capabilities():
    assert parse_target("sm_86") is TARGETS["sm_86"] and parse_target("8.6") is TARGETS["sm_86"]
    assert parse_target("90").name == "sm_90" and parse_target("SM75").bf16 is False
    for bad in ("sm_99", "h100", "", "sm_70"):
        with pytest.raises(ValueError, match="unknown GPU target .* choose one of sm_75, sm_80"):
            parse_target(bad)
    orin = target_for_capability(87, 166_912, "Orin")
    assert (orin.name, orin.family, orin.smem, orin.gpus) == ("sm_87", "ampere", 166_912, "Orin")
    assert target_for_capability(103).family == "blackwell" and target_for_capability(89).smem == 101_376
    with pytest.raises(ValueError, match="need sm_75 or newer"):
        target_for_capability(70)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A pretend CUDA device 0 of a given capability (``fake_cuda(8, 6)``); caches cleared around."""
    from tnlib.ops import targets

    def install(major, minor, smem=None, name="Fake GPU"):
        props = type("Props", (), {"name": name, **({"shared_memory_per_block_optin": smem} if smem else {})})()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        targets._cuda_target.cache_clear()
        _triton._kernels_take.cache_clear()

    yield install
    targets._cuda_target.cache_clear()
    _triton._kernels_take.cache_clear()


def test_device_target_reads_the_device(fake_cuda):
    assert device_target("cpu") is None and device_target(torch.device("meta")) is None
    fake_cuda(8, 6, 101_376, "NVIDIA GeForce RTX 3090")
    t = device_target("cuda:0")
    assert (t.name, t.family, t.smem, t.gpus) == ("sm_86", "ampere", 101_376, "NVIDIA GeForce RTX 3090")
    fake_cuda(9, 0)  # no opt-in limit reported: the table's
    assert device_target("cuda").smem == TARGETS["sm_90"].smem


def test_bf16_without_bf16_takes_the_pytorch_path_with_one_warning(fake_cuda):
    fake_cuda(7, 5, 65_536, "Tesla T4")
    with pytest.warns(UserWarning, match=r"bf16 tensors on Tesla T4 \(sm_75\).*PyTorch paths.*fp16"):
        assert _triton.kernels_take(0, torch.bfloat16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device and dtype
        assert _triton.kernels_take(0, torch.bfloat16) is False
        assert _triton.kernels_take(0, torch.float16) is True and _triton.kernels_take(0, torch.float32) is True
    fake_cuda(7, 0, name="Tesla V100")
    with pytest.warns(UserWarning, match=r"V100 is sm_70; tnlib's Triton kernels need sm_75"):
        assert _triton.kernels_take(0, torch.float16) is False
    fake_cuda(8, 0)
    assert _triton.kernels_take(0, torch.bfloat16) is True


def test_train_precision_per_gpu(fake_cuda):
    from tnlib.train import precision_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert precision_for("auto", cpu) == (None, False) and precision_for("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="fp16' is for CUDA GPUs"):
        precision_for("fp16", cpu)
    fake_cuda(8, 6)
    assert precision_for("auto", cuda) == (torch.bfloat16, False) and precision_for("fp32", cuda) == (None, False)
    assert precision_for("fp16", cuda) == (torch.float16, True)
    fake_cuda(7, 5, name="Tesla T4")
    assert precision_for("auto", cuda) == (torch.float16, True)
    with pytest.raises(ValueError, match=r"dtype='bf16': Tesla T4 \(sm_75\) has no bf16.*dtype=auto or fp16"):
        precision_for("bf16", cuda)
    fake_cuda(7, 0, name="Tesla V100")
    assert precision_for("auto", cuda) == (torch.float16, True)
    with pytest.raises(ValueError, match=r"Tesla V100 \(sm_70\) has no bf16"):
        precision_for("bf16", cuda)


def _kernels(launches):
    return {(l.kernel, l.dtype()) for l in launches}


def test_gpu_check_collects_what_the_launchers_launch():
    """The launches come from the launch code itself (no GPU, no compile): the plan's choices show."""
    from tnlib.gpucheck import collect_launches

    hopper = collect_launches(TARGETS["sm_90"], ["tnl-385m"])
    ampere = collect_launches(TARGETS["sm_86"], ["tnl-385m"])
    turing = collect_launches(TARGETS["sm_75"], ["tnl-385m"])
    for launches in (hopper, ampere, turing):
        assert {"lightning", "segment_state", "feature_map", "srms_fwd", "srms_bwd", "xent_grad", "gemv",
                "fused_gemv", "recurrent", "embed"} <= {k for k, _ in _kernels(launches)}
    assert ("dkdv", "bf16") in _kernels(hopper) and "dkdv" not in {k for k, _ in _kernels(ampere)}
    assert {d for _, d in _kernels(turing)} == {"fp16"}  # T4: fp16 autocast, no bf16 kernels
    assert collect_launches(TARGETS["sm_75"], ["tnl-385m"], [torch.bfloat16]) == []  # bf16 there: PyTorch paths
    fwd = [l for l in hopper if l.kernel == "lightning" and l.constexprs["DK"] == 256 and not l.constexprs["REVERSE"]]
    assert {(l.constexprs["BV"], l.constexprs["CH"], l.num_warps, l.num_stages) for l in fwd} == {(32, 64, 4, 1)}
    assert len({l.key() for l in hopper}) == len(hopper)  # each distinct configuration once
    assert any("tnl-385m train bfloat16 T=2048 (LRPE layer)" in l.uses for l in fwd)
    # the fused decode step (decoder="fused-graph"): broadcast products up to 8 sequences, tl.dot from 16
    # except the short in-place product (out: 4-row broadcast blocks); the long one (down) split 4 ways there
    fused = [l for l in hopper if l.kernel == "fused_gemv"]
    b1 = [l for l in fused if "tnl-385m fused decode bfloat16 B=1" in l.uses]
    b16 = [l for l in fused if "tnl-385m fused decode bfloat16 B=16" in l.uses]
    assert {l.constexprs["DOT"] for l in b1} == {False} and {l.constexprs["SPLIT"] for l in b1} == {1, 2}
    assert {(l.constexprs["DOT"], l.constexprs["BLOCK_M"], l.constexprs["SPLIT"]) for l in b16} == {
        (True, 16, 1), (False, 4, 1), (True, 16, 4)}
    assert {l.constexprs["LRPE"] for l in hopper if l.kernel == "recurrent"} == {True, False}


def test_every_launch_requests_fp_fusion_and_absent_tensors_are_none():
    """Every kernel launch of tnlib (Lightning, feature map, SRMSNorm, loss, decode GEMV) goes through
    ``_triton.launch``, which requests fused multiply-adds at the launch (no environment variable), and an
    optional tensor that is absent is None (no stand-in pointer with zero strides)."""
    from tnlib.gpucheck import collect_launches
    from tnlib.ops._triton import LAUNCH_OPTIONS

    assert LAUNCH_OPTIONS == {"enable_fp_fusion": True}
    launches = collect_launches(TARGETS["sm_90"], ["tnl-385m", "tnl-tiny"], [torch.bfloat16, torch.float32])
    assert {l.kernel for l in launches} >= {"lightning", "dkdv", "segment_state", "feature_map", "srms_fwd",
                                            "srms_bwd", "xent_grad", "gemv", "fused_gemv", "recurrent", "embed"}
    assert all(l.options == {"enable_fp_fusion": True} for l in launches), \
        {(l.kernel, l.describe()) for l in launches if l.options != {"enable_fp_fusion": True}}
    for l in launches:
        if l.kernel in ("lightning", "dkdv"):
            for tensor, flag in (("INIT", "HAS_INIT"), ("LOCAL", "HAS_LOCAL"), ("FINAL", "STORE_FINAL")):
                assert (tensor in l.ptr_types) == l.constexprs[flag] and (l.constexprs.get(tensor, 0) is None) != \
                    l.constexprs[flag], (l.kernel, l.describe())
            assert ("E" in l.ptr_types) == (l.constexprs["GRAD_ACT"] != 0)
        if l.kernel == "fused_gemv":
            for tensor, flag in (("U", "GATE"), ("G", "GAIN"), ("W2", "PAIR"), ("R", "RESIDUAL")):
                assert (tensor in l.ptr_types) == l.constexprs[flag], (l.kernel, l.describe())


def test_gpu_check_command_errors(capsys, monkeypatch):
    from tnlib.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["gpu-check", "--target", "sm_99"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error: unknown GPU target 'sm_99'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["gpu-check"])
    assert e.value.code == 2 and "error: no GPU on this machine: name one with --target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["gpu-check", "--target", "sm_86", "--dtypes", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_gpu_target_is_hashable_for_the_plan_cache():
    assert isinstance(hash(TARGETS["sm_86"]), int) and isinstance(TARGETS["sm_86"], GpuTarget)
