"""Editing methods, one file each. `get_method(name)` returns the class; `METHOD_NAMES` lists them.

Every method has the same small interface (`moecli.methods.base.EditMethod`): it is built on a
loaded model with its config dataclass, applies batches of edits, exports its state for a
checkpoint and can be rebuilt from one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moecli.errors import UserError

if TYPE_CHECKING:  # the method modules load on demand: importing one pulls in torch
    from moecli.methods.base import EditMethod

_MODULES = {
    "memoe": ("moecli.methods.memoe", "MEMoE"),
    "lemoe": ("moecli.methods.lemoe", "LEMoE"),
    "scen": ("moecli.methods.scen", "SCEN"),
    "ft": ("moecli.methods.finetune", "FineTune"),
    "lora": ("moecli.methods.lora", "LoRA"),
    "grace": ("moecli.methods.grace", "GRACE"),
    "wise": ("moecli.methods.wise", "WISE"),
    "locft": ("moecli.methods.locft", "LocFT"),
}
METHOD_NAMES = tuple(_MODULES)


def get_method(name: str) -> type[EditMethod]:
    """The method class for `name`; an unknown name is a one-line UserError listing the known ones."""
    if name not in _MODULES:
        raise UserError(f"--method {name!r}: unknown method (choose from {', '.join(METHOD_NAMES)})")
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)
