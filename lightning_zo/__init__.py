"""lightning_zo: zeroth-order fine-tuning where ranks exchange one byte per step each (Zelikman et al., 2023)."""

from .codecs import LinearCodec, LogCodec, NoneCodec, SignCodec
from .module import ZOClassifier
from .optimizer import ZOOptimizer
from .strategy import ZOStrategy, weights_digest

__all__ = ["ZOStrategy", "ZOOptimizer", "ZOClassifier", "LinearCodec", "LogCodec", "SignCodec", "NoneCodec",
           "weights_digest"]
__version__ = "0.1.0"
