"""moecli: edit the knowledge of a frozen language model with a Mixture-of-Experts bypass.

The Python API: `moecli.load_model(path)` loads a model as every command does (a directory, a .gguf file or
a packaged name, frozen), `moecli.load_edited(model, adapter_dir)` puts a saved adapter on it. Both are
imported on first use, so `import moecli` stays cheap (no torch).
"""

from moecli.version import __version__

__all__ = ["__version__", "load_edited", "load_model"]

_LAZY = {"load_model": "moecli.model.loading", "load_edited": "moecli.engine.adapters"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moecli' has no attribute {name!r}")
