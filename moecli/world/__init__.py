"""The embedded default: a generated fact world and the knowledge-model trainer."""
