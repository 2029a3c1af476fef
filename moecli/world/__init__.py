"""The embedded default: a generated fact world and the knowledge-model trainer.

- `generator`: the deterministic fact world (`build_world(seed)`), its facts and its edit set.
- `trainer`: `train_knowledge_model(facts, out_dir, config)`, a small Llama LM trained until it
  knows a list of (prompt, answer) facts.
- `store`: where built models live (`default_model_dir()`, `benchmark_model_dir(path, n)`; under
  `moecli.paths.cache_root()`).
- `commands`: the `moecli world` commands.

The store functions are imported lazily so that importing `moecli.world` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["benchmark_model_dir", "default_model_dir"]



def default_model_dir(progress=None) -> Path:
    """The default `--model` of every command: the fact-world model (committed, or built on first use)."""
    from moecli.world.store import default_model_dir as _default

    return _default(progress=progress)


def benchmark_model_dir(path, n: int = 1000, progress=None, **kwargs) -> Path:
    """The knowledge model of the first `n` records of a benchmark file (cached, or trained now)."""
    from moecli.world.store import benchmark_model_dir as _bench

    return _bench(path, n, progress, **kwargs)
