"""lightning_zo: zeroth-order fine-tuning where ranks exchange one byte per step each (Zelikman et al., 2023)."""

from .core.codecs import LinearCodec, LogCodec, NoneCodec, SignCodec
from .recipe.classifier import ZOClassifier
from .core.optimizer import ZOOptimizer
from .core.layout import weights_digest
from .integration.strategy import ZOStrategy

__all__ = ["ZOStrategy", "ZOOptimizer", "ZOClassifier", "LinearCodec", "LogCodec", "SignCodec", "NoneCodec",
           "weights_digest"]
__version__ = "0.1.0"
