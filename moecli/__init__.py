"""moecli: edit the knowledge of a frozen language model with a Mixture-of-Experts bypass."""

__version__ = "0.1.0"


def load_edited(model, adapter_dir, tokenizer=None):
    """Put a saved moecli adapter onto `model` (see `moecli.engine.load_edited`)."""
    from moecli.engine import load_edited as _load_edited

    return _load_edited(model, adapter_dir, tokenizer)
