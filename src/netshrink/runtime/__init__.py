"""Runtimes that execute exported models, behind one interface (a module torch can call)."""

from netshrink.runtime.base import ModelStats, RuntimeModule, model_stats
from netshrink.runtime.sessions import RUNTIMES, open_runtime, require

__all__ = ["RUNTIMES", "ModelStats", "RuntimeModule", "model_stats", "open_runtime", "require"]
