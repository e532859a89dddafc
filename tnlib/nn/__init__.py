"""Building blocks of TransNormerLLM: decay slopes, LRPE-d (more modules arrive with the model)."""
from .decay import DECAY_FORMULAS, alibi_slopes, decay_slopes, decay_table, half_life
from .lrpe import LRPE, lrpe, lrpe_theta_init

__all__ = ["DECAY_FORMULAS", "alibi_slopes", "decay_slopes", "decay_table", "half_life", "LRPE", "lrpe", "lrpe_theta_init"]
