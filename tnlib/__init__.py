"""tnlib: a step-by-step, tested reproduction of TransNormerLLM. Start at notebooks/01_linear_attention."""
__version__ = "0.1.0"

from . import nn, ops, testing  # noqa: E402
from .files import FileDamaged  # noqa: E402
from .generation import DecoderCache, generate, stream_generate  # noqa: E402
from .models import Implementation, ModelConfig, create_model, load_model, save_model  # noqa: E402
from .official import load_official, save_official  # noqa: E402

__all__ = ["nn", "ops", "testing", "FileDamaged", "ModelConfig", "Implementation", "create_model", "load_model",
           "save_model", "generate", "stream_generate", "DecoderCache", "load_official", "save_official", "__version__"]
