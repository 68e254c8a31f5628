"""lightning_zo: zeroth-order fine-tuning where ranks exchange one byte per step each (Zelikman et al., 2023).

Layers, each importing only those below it:
- `lightning_zo.core`: generator, kernels, parameter layout, engine, codecs, `ZOOptimizer`, trajectory format
  (torch only, never Lightning);
- `lightning_zo.integration`: `ZOStrategy` ("zo", "zo_spawn") and the callbacks (Lightning);
- `lightning_zo.recipe`: prompt classification (tasks, data, models, `ZOClassifier`);
- tools: `lightning_zo.cli` (the `lightning-zo` command), `.replay`, `.report`, `.bench`.
"""

from .core.codecs import LinearCodec, LogCodec, NoneCodec, SignCodec
from .core.coverage import check_coverage
from .core.layout import weights_digest
from .core.optimizer import ZOOptimizer
from .integration.callbacks import ReplicaChecksum, RunSummary, TrajectoryLog
from .integration.strategy import ZOStrategy, register
from .recipe.classifier import ZOClassifier

register()

__all__ = ["ZOStrategy", "ZOOptimizer", "ZOClassifier", "TrajectoryLog", "RunSummary", "ReplicaChecksum",
           "LinearCodec", "LogCodec", "SignCodec", "NoneCodec", "weights_digest", "check_coverage"]
__version__ = "0.2.0"
