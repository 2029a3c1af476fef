"""moecli: edit the knowledge of a frozen language model with a Mixture-of-Experts bypass."""

__version__ = "0.1.0"
