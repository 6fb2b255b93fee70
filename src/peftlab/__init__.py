"""peftlab: fine-tune transformer encoders for text classification — full, LoRA, AdaLoRA, DoRA — and
compare them honestly. The functions below are the Python API; the CLI calls the same ones."""

from . import config
from .errors import ConfigError, DataError, ExportError, PeftlabError, RunError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ExportError",
    "PeftlabError",
    "RunError",
    "config",
    "evaluate",
    "info",
    "load_run",
    "predict",
    "train",
]


def __getattr__(name):  # heavy imports (torch) only when a workflow is used
    if name in ("train", "evaluate", "predict", "info", "load_run"):
        from . import workflows

        return getattr(workflows, name)
    raise AttributeError(name)
