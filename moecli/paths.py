"""The two places moecli reads and writes besides the user's own files.

- `ASSETS`: what the package ships (recipes, calibration data, question keys, the fact-world model).
- `cache_root()`: what moecli makes once and reuses (converted GGUF models, question keys calibrated for a
  model, the unedited model's evaluations, built fact-world models): `$MOECLI_CACHE`, else
  `$XDG_CACHE_HOME/moecli`, else `~/.cache/moecli`. Every cache lives under it.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def cache_root() -> Path:
    env = os.environ.get("MOECLI_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moecli"
