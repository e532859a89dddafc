"""Building blocks of TransNormerLLM: decay slopes, LRPE-d, norms, GLA and SGLU."""
from .decay import DECAY_FORMULAS, alibi_slopes, decay_slopes, decay_table, half_life
from .linear import Linear
from .gla import SGLU, GatedLinearAttention
from .lrpe import LRPE, lrpe, lrpe_theta_init
from .norm import NORMS, RMSNorm, SRMSNorm, build_norm

__all__ = [
    "DECAY_FORMULAS", "alibi_slopes", "decay_slopes", "decay_table", "half_life",
    "LRPE", "lrpe", "lrpe_theta_init",
    "NORMS", "SRMSNorm", "RMSNorm", "build_norm",
    "GatedLinearAttention", "SGLU", "Linear",
]
