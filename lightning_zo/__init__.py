"""lightning_zo: zeroth-order fine-tuning where ranks exchange one byte per step each (Zelikman et al., 2023).

Layers, each importing only those below it:
- `lightning_zo.core`: generator, kernels, parameter layout, backend, perturbed forward, codecs, `ZOOptimizer`,
  trajectory format (torch only: importing it loads neither Lightning, Hydra nor torchmetrics);
- `lightning_zo.integration`: `ZOStrategy` ("zo", "zo_spawn"), the callbacks, `ZOFabric` (Lightning);
- `lightning_zo.recipe`: prompt classification (tasks, data, models, `ZOClassifier`);
- tools: `lightning_zo.cli` (the `lightning-zo` command; `.precheck`, its checks of the overrides), `.replay`,
  `.report`, `.bench`.

This face loads each name on first use (`lightning_zo.ZOStrategy` loads Lightning, `lightning_zo.ZOOptimizer` only
torch), and makes `Trainer(strategy="zo")` work as soon as Lightning is loaded, whichever was imported first.

"DESIGN §n" and "DESIGN In" in comments and docstrings refer to docs/DESIGN.md (its sections and invariants I1-I7).
"""

import importlib
import importlib.abc
import importlib.util
import sys

_NAMES = {
    ".core.codecs": ("LinearCodec", "LogCodec", "NoneCodec", "SignCodec"),
    ".core.coverage": ("check_coverage",),
    ".core.layout": ("weights_digest",),
    ".core.optimizer": ("ZOOptimizer",),
    ".integration.callbacks": ("ReplicaChecksum", "RunSummary"),
    ".integration.trajectory_log": ("TrajectoryLog",),
    ".integration.strategy": ("ZOStrategy",),
    ".recipe.classifier": ("ZOClassifier",),
}
_HOME = {name: module for module, names in _NAMES.items() for name in names}

__all__ = ["ZOStrategy", "ZOOptimizer", "ZOClassifier", "TrajectoryLog", "RunSummary", "ReplicaChecksum",
           "LinearCodec", "LogCodec", "SignCodec", "NoneCodec", "weights_digest", "check_coverage"]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'lightning_zo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


def _register_strategies() -> None:
    """Loading the strategy's module registers it (at its end; a load in progress will)."""
    importlib.import_module(".integration.strategy", __name__)


class _RegisterWithLightning(importlib.abc.MetaPathFinder):
    """Registers "zo" and "zo_spawn" with Lightning's strategy registry right after `lightning.pytorch` has loaded
    (its registry is complete then), so that importing lightning_zo loads no Lightning. Off `sys.meta_path` as soon
    as it has found that module."""

    def find_spec(self, name, path=None, target=None):
        if name != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the finders after this one, as if it were not there
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register_strategies()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing shared is patched
        return spec


if "lightning.pytorch" in sys.modules:
    _register_strategies()
elif not any(isinstance(f, _RegisterWithLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithLightning())
