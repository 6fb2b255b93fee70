"""peftlab: fine-tune transformer encoders for text classification — full, LoRA, AdaLoRA, DoRA — and
compare them honestly. The functions below are the Python API; the CLI calls the same ones.

    import peftlab
    cfg = peftlab.config.load("configs/banking77-lora.yaml", ["train.epochs=3"])
    run = peftlab.train(cfg)            # the run folder
    peftlab.evaluate(run)["accuracy"]
    peftlab.predict(run, ["my card has not arrived"], top_k=3)
    peftlab.export(run, "merged", "intents-model")
    peftlab.compare("configs/compare-banking77.yaml", data_dir="../shared/data")

No submodule is named after a function of the API, so these names stay functions whatever has been
imported. Heavy parts (torch) load when a function is first used.
"""

from . import config
from .errors import ConfigError, DataError, ExportError, PeftlabError, RunError

__version__ = "0.1.0"

# API name → (module, function): the module is imported when the name is first used.
_API = {
    "train": ("workflows", "train"),
    "evaluate": ("workflows", "evaluate"),
    "predict": ("workflows", "predict"),
    "info": ("workflows", "info"),
    "load_run": ("rundir", "load_run"),
    "export": ("exporting", "export"),
    "compare": ("matrix", "run"),
    "compare_runs": ("matrix", "compare_runs"),
    "serve": ("server", "serve"),
}

__all__ = ["ConfigError", "DataError", "ExportError", "PeftlabError", "RunError", "config", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        module, function = _API[name]
        value = getattr(importlib.import_module(f".{module}", __name__), function)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
