"""moecli: edit the knowledge of a frozen language model with a Mixture-of-Experts bypass."""

from moecli.version import __version__

__all__ = ["__version__", "load_edited"]


def load_edited(model, adapter_dir, tokenizer=None):
    """Put a saved moecli adapter onto `model` (see `moecli.engine.adapters.load_edited`)."""
    from moecli.engine.adapters import load_edited as _load_edited

    return _load_edited(model, adapter_dir, tokenizer)
