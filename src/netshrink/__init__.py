"""netshrink: make CNNs smaller and faster, and prove what was gained.

The front door is one verb per task: ``netshrink.prune``, ``quantize``, ``distill``,
``finetune``, ``measure``, ``export``, ``load``, ``run`` and ``compress``, with their typed configs
(``netshrink.ChannelPruneConfig(ratio=0.3)``, ``netshrink.PTQConfig()``...). They are
imported on first use, so ``import netshrink`` stays cheap.

``netshrink.prune``, ``netshrink.distill`` and ``netshrink.export`` are also the packages
of those methods (``from netshrink.prune import prune_channels``): the package is
callable, and calling it is the verb.

Progress goes to the ``netshrink`` logger and its children (``logging``), silent until
the application configures logging (``logging.basicConfig(level=logging.INFO)`` shows
it); the ``netshrink`` command prints it.
"""

import importlib
import logging
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# A library leaves handlers to the application (the logging HOWTO): without one of its
# own, a record would reach Python's last-resort handler and print.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_API = frozenset({
    "Bf16Config", "BlockPruneConfig", "ChannelPruneConfig", "CompressConfig", "Compressed",
    "DistillConfig", "DynamicConfig", "ExportConfig", "FinetuneConfig", "Fp16Config",
    "IterableSplit", "KMeansConfig", "MagnitudePruneConfig", "MeasureOptions", "ModelSpec",
    "NMPruneConfig", "PTQConfig", "QATConfig", "TrainConfig", "as_split", "build_model",
    "finetune", "load", "measure", "quantize", "run",
})
_VERB_PACKAGES = frozenset({"prune", "distill", "export", "compress", "study"})

__all__ = ["__version__", *sorted(_API | _VERB_PACKAGES)]


class VerbPackage(ModuleType):
    """A method's package that is also its verb: ``netshrink.prune(model, config)`` calls
    ``netshrink.api.prune``, while ``netshrink.prune.channel`` stays the module."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from netshrink import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def make_verb_package(name: str) -> None:
    """Make the package ``name`` (``prune``, ``distill``, ``export``, ``compress``,
    ``study``) callable;
    each calls this on itself as it is imported."""
    sys.modules[name].__class__ = VerbPackage


def __getattr__(name: str) -> Any:
    if name in _VERB_PACKAGES:
        return importlib.import_module(f"netshrink.{name}")
    if name in _API:
        from netshrink import api

        return getattr(api, name)
    raise AttributeError(f"module 'netshrink' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, *_VERB_PACKAGES])
