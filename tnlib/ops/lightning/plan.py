"""Launch planning for the Lightning kernels: tile configurations and the segment plan.

Everything a launch needs beyond the tensors comes from :func:`launch_config`, one frozen
:class:`LaunchConfig` per (shape, dtype). ``lightning_attention(..., config=...)`` takes another one
(e.g. ``dataclasses.replace(launch_config(...), seg_len=128)``) for tuning and tests. The tile
sizes are the winners of ``tools/tune_lightning.py`` (``results/bench/NOTES-kernels.md``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Tile", "LaunchConfig", "launch_config", "segment_plan"]

# Split sequences into parallel segments only when the forward has fewer CTAs than SPLIT_BELOW, and
# then aim for about TARGET_CTAS of them, with segments of at least MIN_SEG tokens.
SPLIT_BELOW = 256
TARGET_CTAS = 512
MIN_SEG = 512


@dataclass(frozen=True)
class Tile:
    """One kernel launch's tiling: ``chunk`` tokens per step, ``block_v`` value columns per CTA,
    warps and pipeline stages; ``scale_value``: the generic kernel's state update scales the value
    tile (``SCALE_C``) rather than the key tile."""

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


def _generic_tile(DK: int, DV: int, fp32: bool) -> Tile:
    """A pass of the generic kernel whose query/key width is ``DK`` and value width ``DV``."""
    if fp32:
        t = Tile(32 if DK >= 128 else 64, min(DV, 32), 4, 1)
    elif DK >= 256:
        t = Tile(64, min(DV, 32), 4, 1)
    else:
        t = Tile(64, min(DV, 64), 4, 2)
    # the value-scaled update spills less, but its build faulted at DK = 256 on the GPU and it was
    # never run at scale in fp32: those keep the key-scaled form (results/bench/NOTES-kernels.md)
    return dataclasses.replace(t, scale_value=DK <= 128 and not fp32)


def segment_plan(B: int, H: int, T: int, n_vblocks: int, target_ctas: int = TARGET_CTAS) -> int:
    """Segment length: ``T`` when ``n_vblocks * B * H`` CTAs fill the GPU, else about ``target_ctas``
    CTAs' worth of segments (``n_vblocks`` counted as at least 2, the value the plan was tuned with)."""
    if n_vblocks * B * H >= SPLIT_BELOW:
        return max(T, 1)
    want = -(-target_ctas // (max(2, n_vblocks) * B * H))
    seg = T if want <= 1 else max(MIN_SEG, -(-T // want))
    return max(-(-seg // 128) * 128, 1)


def launch_config(B: int, T: int, H: int, DK: int, DV: int, dtype: torch.dtype) -> LaunchConfig:
    """The default launches for ``q, k: [B, T, H, DK]``, ``v: [B, T, H, DV]`` of ``dtype``.

    Works on symbolic sizes too (the custom ops' fake implementations call it under
    ``torch.compile``)."""
    fp32 = dtype == torch.float32
    fwd = _generic_tile(DK, DV, fp32)
    state = fwd if fp32 else Tile(64, min(DV, 128 if DK <= 128 else 64), 8, 2, True)
    dkdv = None  # one reverse sweep for dk and dv needs the whole [DK, DV] state in one CTA
    if DK <= 128 and DV <= 128 and (not fp32 or DK * DV <= 64 * 64):
        dkdv = Tile(32 if fp32 else 64, DV, 8 if DK * DV >= 128 * 128 else 4, 1 if fp32 else 2)
    return LaunchConfig(seg_len=segment_plan(B, H, T, DV // fwd.block_v), forward=fwd,
                        dq=_generic_tile(DV, DK, fp32), state=state, dkdv=dkdv,
                        dv=_generic_tile(DK, DV, fp32), dk=_generic_tile(DV, DK, fp32))
