"""GPU targets: what the launch plans need to know about a GPU, from its compute capability.

A :class:`GpuTarget` names a compute capability (``sm_86``), its shared-memory opt-in limit per
block, whether Triton has a bf16 tensor-core path there, and the row of launch tiles it takes
(``tnlib.ops.lightning.plan.PLANS``). :data:`TARGETS` lists the ones tnlib plans for; the target of a
tensor comes from its device (:func:`device_target`: ``torch.cuda.get_device_capability`` and the
device's own shared-memory limit) or is named explicitly (:func:`parse_target`, ``python -m tnlib
gpu-check --target sm_75``). Nothing here is a global setting: every launch looks its device up.

The limits are NVIDIA's opt-in maximum of shared memory per block (``cudaDevAttrMaxSharedMemoryPerBlockOptin``),
the figure Triton checks a kernel against ("out of resource: shared memory").
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["GpuTarget", "TARGETS", "MIN_CAPABILITY", "device_target", "parse_target", "target_for_capability"]

#: Older GPUs (sm_70 and below) get no Triton kernels: the PyTorch paths run there.
MIN_CAPABILITY = 75


@dataclass(frozen=True)
class GpuTarget:
    """One compute capability as the plans see it.

    ``capability``: 86 for sm_86; ``smem``: shared memory a block may opt into, bytes; ``bf16``:
    whether Triton compiles bf16 dots to tensor cores there (sm_80 and newer; without it bf16 tensors
    take the PyTorch paths); ``family``: the row of ``plan.PLANS`` (tiles) it uses; ``gpus``: examples."""

    capability: int
    smem: int
    bf16: bool
    family: str
    gpus: str

    @property
    def name(self) -> str:
        return f"sm_{self.capability}"


#: The targets tnlib plans for (compile-checked on a CPU by ``python -m tnlib gpu-check``).
#: family "turing": Triton has no tensor-core dot below sm_80 (its dots are fp32 FMAs), so small tiles;
#: "ampere": mma.sync, operands in registers, so value blocks and chunks of 32 and two-pass dk/dv;
#: "hopper": wgmma, the measured H200 tiles; "blackwell": tcgen05 (datacenter Blackwell).
TARGETS: dict[str, GpuTarget] = {t.name: t for t in (
    GpuTarget(75, 65_536, False, "turing", "T4, RTX 20xx, Quadro RTX"),
    GpuTarget(80, 166_912, True, "ampere", "A100, A30"),
    GpuTarget(86, 101_376, True, "ampere", "RTX 30xx, A10, A40, RTX A6000"),
    GpuTarget(89, 101_376, True, "ampere", "RTX 40xx, L4, L40S, RTX 6000 Ada"),
    GpuTarget(90, 232_448, True, "hopper", "H100, H200, GH200"),
    GpuTarget(100, 232_448, True, "blackwell", "B200, GB200"),
    GpuTarget(120, 101_376, True, "ampere", "RTX 50xx, RTX PRO 6000 Blackwell"),
)}


def target_for_capability(capability: int, smem: Optional[int] = None, gpus: Optional[str] = None) -> GpuTarget:
    """The target of a compute capability (e.g. 87): the listed one, else the nearest listed one below
    it (same tiles) with the device's ``smem`` limit where given. Raises ``ValueError`` below sm_75."""
    if capability < MIN_CAPABILITY:
        raise ValueError(f"sm_{capability}: tnlib's Triton kernels need sm_{MIN_CAPABILITY} or newer")
    base = max((t for t in TARGETS.values() if t.capability <= capability), key=lambda t: t.capability)
    if base.capability != capability:
        base = dataclasses.replace(base, capability=capability, gpus=gpus or f"sm_{capability}")
    return dataclasses.replace(base, smem=smem or base.smem, gpus=gpus or base.gpus)


def parse_target(text: str) -> GpuTarget:
    """``"sm_86"`` (also ``"86"``, ``"8.6"``, ``"sm86"``) -> its target; ``ValueError`` naming the choices."""
    t = str(text).strip().lower().removeprefix("sm_").removeprefix("sm")
    try:
        cap = round(float(t) * 10) if "." in t else int(t)
    except ValueError:
        cap = None
    if cap is None or f"sm_{cap}" not in TARGETS:
        raise ValueError(f"unknown GPU target {text!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[f"sm_{cap}"]


def device_target(device) -> Optional[GpuTarget]:
    """The target of a CUDA ``device`` (its capability and its own shared-memory limit), or None for any
    other device (the CPU interpreter plans as for sm_90). ``ValueError`` for GPUs below sm_75."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> GpuTarget:
    """Looked up once per device: a launch must not pay for a driver query."""
    major, minor = torch.cuda.get_device_capability(index)
    props = torch.cuda.get_device_properties(index)
    return target_for_capability(10 * major + minor, getattr(props, "shared_memory_per_block_optin", None),
                                 props.name)
