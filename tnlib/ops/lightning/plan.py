"""Launch planning for the Lightning kernels: tile configurations per GPU family and the segment plan.

Everything a launch needs beyond the tensors comes from :func:`launch_config`, one frozen
:class:`LaunchConfig` per (shape, dtype, GPU target). The tiles come from one table, :data:`PLANS`:
a row per GPU family (``tnlib.ops.targets``: Turing, Ampere/Ada/consumer Blackwell, Hopper,
datacenter Blackwell) and input precision. The Hopper rows are the winners of
``tools/tune_lightning.py`` on the H200 (``results/bench/NOTES-kernels.md``); the others were chosen
on a CPU to fit each target's shared memory with no or few register spills (``python -m tnlib
gpu-check``, ``results/gpus/NOTES.md``). ``lightning_attention(..., config=...)`` takes another
config (e.g. ``dataclasses.replace(launch_config(...), seg_len=128)``, or another target's plan) for
tuning and tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Tile", "LaunchConfig", "Plan", "PLANS", "plan_for", "launch_config", "segment_plan",
           "varlen_segment_plan"]

# Split sequences into parallel segments only when the forward has fewer CTAs than SPLIT_BELOW, and
# then aim for about TARGET_CTAS of them, with segments of at least MIN_SEG tokens.
SPLIT_BELOW = 256
TARGET_CTAS = 512
MIN_SEG = 512


@dataclass(frozen=True)
class Tile:
    """One kernel launch's tiling: ``chunk`` tokens per step, ``block_v`` value columns per CTA,
    warps and pipeline stages; ``scale_value``: the state update of the generic kernel or the
    segment-state kernel scales the value tile (their ``SCALE_C``) rather than the key tile (the fused
    dk/dv kernel always scales the key tile: ``dkdv`` tiles leave it False)."""

    chunk: int
    block_v: int
    num_warps: int
    num_stages: int
    scale_value: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    """The launches of one forward and backward: ``seg_len`` tokens per parallel segment (``>= T``:
    one segment); ``forward``, ``dq``, ``dv``, ``dk``: passes of the generic kernel (``dv``, ``dk``
    only when ``dkdv`` is None); ``dkdv``: the fused reverse sweep (``block_v`` = V); ``state``: the
    segment-state kernel."""

    seg_len: int
    forward: Tile
    dq: Tile
    state: Tile
    dkdv: Optional[Tile]
    dv: Tile
    dk: Tile

    def n_seg(self, T: int) -> int:
        return -(-T // self.seg_len)

    def check(self, K: int, V: int) -> None:
        """Raise ``ValueError`` unless each generic pass's value block divides its value width (else the
        grid would skip value columns) and segments are at least one token."""
        for name, width in (("forward", V), ("dq", K), ("state", V), ("dv", V), ("dk", K)):
            bv = getattr(self, name).block_v
            if bv < 1 or width % bv:
                raise ValueError(f"launch config: {name}.block_v = {bv} must divide the value width {width}")
        if self.seg_len < 1:
            raise ValueError(f"launch config: seg_len must be >= 1, got {self.seg_len}")

    def to_ints(self) -> list[int]:
        """Flat ints (custom ops take no dataclasses); a missing ``dkdv`` is chunk 0."""
        tiles = (self.forward, self.dq, self.state, self.dkdv or Tile(0, 0, 0, 0), self.dv, self.dk)
        return [int(self.seg_len)] + [int(x) for t in tiles for x in dataclasses.astuple(t)]

    @classmethod
    def from_ints(cls, xs) -> "LaunchConfig":
        t = [Tile(*xs[i:i + 4], bool(xs[i + 4])) for i in range(1, len(xs), 5)]
        return cls(xs[0], t[0], t[1], t[2], t[3] if t[3].chunk else None, t[4], t[5])


@dataclass(frozen=True)
class Plan:
    """The tiles of one GPU family for one input precision (a row of ``PLANS``).

    ``generic`` (passes of the generic kernel) and ``state`` (the segment-state kernel) by key width:
    64 (any width up to 64), 128, 256; ``dkdv`` by state size DK * DV: up to 64 * 64, 128 * 64 and
    128 * 128 (wider states have no fused kernel). A tile's ``block_v`` is a cap: a pass takes
    ``min(cap, its value width)``; the fused kernel's is the whole value width (0 here). ``state``
    None: the forward's tile, with ``scale_value`` (the segment-state kernel scales the value tile at
    every width). A ``dkdv`` entry of None: dk and dv as two passes of the generic kernel."""

    generic: dict
    state: Optional[dict]
    dkdv: dict

    def generic_tile(self, DK: int, DV: int) -> Tile:
        t = self.generic[_width(DK)]
        return dataclasses.replace(t, block_v=min(DV, t.block_v))

    def state_tile(self, DK: int, DV: int) -> Optional[Tile]:
        if self.state is None:
            return None
        t = self.state[_width(DK)]
        return dataclasses.replace(t, block_v=min(DV, t.block_v))

    def dkdv_tile(self, DK: int, DV: int) -> Optional[Tile]:
        if DK > 128 or DV > 128:
            return None
        t = self.dkdv[min(s for s in self.dkdv if s >= DK * DV)]
        return None if t is None else dataclasses.replace(t, block_v=DV)


def _width(DK: int) -> int:
    return 64 if DK <= 64 else DK


V16, F32 = "16-bit", "fp32"  # input precision: fp16/bf16 (fp32 accumulation) or fp32 (exact fp32 dots)

#: The launch table: family (``targets.GpuTarget.family``) x input precision -> tiles. Each row was
#: chosen on a CPU from ``triton.compile`` + ptxas for its targets (shared memory within the limit,
#: no or few register spills: ``python -m tnlib gpu-check``, ``results/gpus/NOTES.md``); only the
#: Hopper rows are timed (the H200 tuning of ``results/bench/NOTES-kernels.md``). ``scale_value``
#: (value-scaled state update) in the generic passes only for 16-bit inputs with DK <= 128: at DK = 256
#: its build faulted on the H200, and fp32 never ran it at scale; the segment-state kernel's tiles (its
#: own kernel, measured so at every width) always scale the value tile.
PLANS: dict[tuple[str, str], Plan] = {
    # H100, H200 (sm_90): the H200 tuning
    #                     key width DK:  <= 64                       128                          256
    ("hopper", V16): Plan(generic={64: Tile(64, 64, 4, 2, True), 128: Tile(64, 64, 4, 2, True), 256: Tile(64, 32, 4, 1)},
                          state={64: Tile(64, 128, 8, 2, True), 128: Tile(64, 128, 8, 2, True),
                                 256: Tile(64, 64, 8, 2, True)},
                          #   DK * DV:  <= 64 * 64                <= 128 * 64               <= 128 * 128
                          dkdv={64 * 64: Tile(64, 0, 4, 2), 128 * 64: Tile(64, 0, 4, 2), 128 * 128: Tile(64, 0, 8, 2)}),
    ("hopper", F32): Plan(generic={64: Tile(64, 32, 4, 1), 128: Tile(32, 32, 4, 1), 256: Tile(32, 32, 4, 1)},
                          state=None,
                          dkdv={64 * 64: Tile(32, 0, 4, 1), 128 * 64: None, 128 * 128: None}),
    # fp32 inputs, every family but Hopper's (kept as tuned): exact fp32 dots are FMAs, small tiles and 8 warps
    # A100, RTX 30xx/40xx/50xx, L4 (sm_80, sm_86, sm_89, sm_120): mma.sync keeps dot operands in registers
    ("ampere", V16): Plan(generic={64: Tile(64, 64, 4, 2, True), 128: Tile(32, 32, 4, 2, True), 256: Tile(32, 32, 8, 1)},
                          state={64: Tile(64, 128, 8, 2, True), 128: Tile(64, 128, 8, 2, True),
                                 256: Tile(64, 64, 8, 2, True)},
                          dkdv={64 * 64: None, 128 * 64: None, 128 * 128: None}),
    ("ampere", F32): Plan(generic={64: Tile(16, 16, 8, 1), 128: Tile(16, 16, 8, 1), 256: Tile(16, 16, 8, 1)},
                          state=None,
                          dkdv={64 * 64: None, 128 * 64: None, 128 * 128: None}),
    # T4, RTX 20xx (sm_75): Triton's dots are fp32 FMAs there (no tensor cores): small tiles, 8 warps
    ("turing", V16): Plan(generic={64: Tile(16, 16, 4, 1), 128: Tile(16, 16, 8, 1), 256: Tile(16, 16, 8, 1)},
                          state={64: Tile(32, 32, 8, 1, True), 128: Tile(32, 32, 8, 1, True), 256: Tile(16, 32, 8, 1, True)},
                          dkdv={64 * 64: None, 128 * 64: None, 128 * 128: None}),
    ("turing", F32): Plan(generic={64: Tile(16, 16, 8, 1), 128: Tile(16, 16, 8, 1), 256: Tile(16, 16, 8, 1)},
                          state=None,
                          dkdv={64 * 64: None, 128 * 64: None, 128 * 128: None}),
    # B200 (sm_100): tcgen05 takes its operands from shared and tensor memory; Hopper's tiles, 8 warps at DK = 256
    ("blackwell", V16): Plan(generic={64: Tile(64, 64, 4, 2, True), 128: Tile(64, 64, 4, 2, True), 256: Tile(64, 32, 8, 1)},
                             state={64: Tile(64, 128, 8, 2, True), 128: Tile(64, 128, 8, 2, True),
                                    256: Tile(64, 64, 8, 2, True)},
                             dkdv={64 * 64: Tile(64, 0, 4, 2), 128 * 64: Tile(64, 0, 4, 2), 128 * 128: Tile(64, 0, 8, 2)}),
    ("blackwell", F32): Plan(generic={64: Tile(16, 16, 8, 1), 128: Tile(16, 16, 8, 1), 256: Tile(16, 16, 8, 1)},
                             state=None,
                             dkdv={64 * 64: None, 128 * 64: None, 128 * 128: None}),
}


def plan_for(target=None, dtype: torch.dtype = torch.bfloat16) -> Plan:
    """The row of ``PLANS`` for a ``tnlib.ops.targets.GpuTarget`` (None: the CPU interpreter, which
    plans as sm_90) and an input dtype."""
    family = "hopper" if target is None else target.family
    return PLANS[(family, F32 if dtype == torch.float32 else V16)]


def segment_plan(B: int, H: int, T: int, n_vblocks: int, target_ctas: int = TARGET_CTAS) -> int:
    """Segment length: ``T`` when ``n_vblocks * B * H`` CTAs fill the GPU, else about ``target_ctas``
    CTAs' worth of segments (``n_vblocks`` counted as at least 2, the value the plan was tuned with)."""
    if n_vblocks * B * H >= SPLIT_BELOW:
        return max(T, 1)
    want = -(-target_ctas // (max(2, n_vblocks) * B * H))
    seg = T if want <= 1 else max(MIN_SEG, -(-T // want))
    return max(-(-seg // 128) * 128, 1)


def varlen_segment_plan(total: int, H: int, n_vblocks: int) -> int:
    """Segment length for packed sequences (``cu_seqlens``) of ``total`` tokens: the tokens each of
    ``SPLIT_BELOW`` programs would take if the work (``n_vblocks``, counted as at least 2, value blocks per
    head) were spread evenly, at least ``MIN_SEG``, a multiple of 128. Sequences up to that length run as one
    program each (longest first); a longer one is cut into segments that run in parallel, so a long document
    among short ones does not finish alone. Depends on shapes only: the lengths are on the device."""
    per_program = -(-total * H * max(2, n_vblocks) // SPLIT_BELOW)
    return max(MIN_SEG, -(-per_program // 128) * 128)


def launch_config(B: int, T: int, H: int, DK: int, DV: int, dtype: torch.dtype, target=None,
                  varlen: bool = False) -> LaunchConfig:
    """The default launches for ``q, k: [B, T, H, DK]``, ``v: [B, T, H, DV]`` of ``dtype`` on ``target``
    (a ``tnlib.ops.targets.GpuTarget``; the op passes the tensors' device's, ``targets.device_target``;
    None: the CPU interpreter, planned as sm_90). ``varlen``: ``B = 1`` and the ``T`` rows hold packed
    sequences (``cu_seqlens``): the same tiles, segments from :func:`varlen_segment_plan`.

    Works on symbolic sizes too (the custom ops' fake implementations call it under
    ``torch.compile``)."""
    plan = plan_for(target, dtype)
    fwd = plan.generic_tile(DK, DV)
    state = plan.state_tile(DK, DV) or dataclasses.replace(fwd, scale_value=True)
    nvb = DV // fwd.block_v
    seg_len = varlen_segment_plan(T, H, nvb) if varlen else segment_plan(B, H, T, nvb)
    return LaunchConfig(seg_len=seg_len, forward=fwd,
                        dq=plan.generic_tile(DV, DK), state=state,
                        dkdv=plan.dkdv_tile(DK, DV), dv=plan.generic_tile(DK, DV), dk=plan.generic_tile(DV, DK))
