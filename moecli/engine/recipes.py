"""YAML recipes → typed method configs. Recipe values are defaults; CLI flags override them.

A recipe is a flat YAML mapping: `method:` plus the fields of that method's config dataclass
(see `moecli/methods/<method>.py`), and optionally `batch_size` and `seed`. Unknown keys and
out-of-range values are refused with one line naming the key, so a typo never silently runs a
different experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from moecli.errors import UserError
from moecli.methods import get_method
from moecli.methods.base import MethodConfig, config_from_dict
from moecli.paths import ASSETS

RUN_KEYS = ("method", "batch_size", "seed")
RECIPES_DIR = ASSETS / "recipes"  # shipped in the wheel
SET_HELP = ("help", "?")  # `--set help`: list the method's options instead of running
COMMENT_WIDTH = 116  # a recipe's help comments, "# " included, stay within the 120 columns of the code


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file, or a shipped recipe named without a path (`lemoe`, `scen-paper`), into a dict;
    a missing file or bad YAML is a one-line UserError."""
    path = Path(path)
    shipped = RECIPES_DIR / f"{path.name}.yaml"
    if not path.is_file() and str(path) == path.name and not path.suffix and shipped.is_file():
        path = shipped
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"--recipe {path}: no such file (or a shipped recipe: {names})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--recipe {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--recipe {path}: expected a mapping of option: value")
    return data


def _coerce(config_class: type, key: str, raw: str) -> Any:
    """Turn a `--set key=value` string into the field's type."""
    hints = get_type_hints(config_class)
    if key not in hints:
        raise UserError(f"--set {key}: unknown option ({_known_keys(config_class, key)}; --set help describes them)")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # not YAML: keep the text; the type check names the key if a string is wrong here


def _known_keys(config_class: type, key: str) -> str:
    """'did you mean ...; known: ...' for an unknown option `key`."""
    names = sorted(f.name for f in dataclasses.fields(config_class))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}known: {', '.join(names)}"


def build_config(
    method: str, recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None, source: str = "recipe",
) -> MethodConfig:
    """Method config = dataclass defaults ← recipe ← explicit flags (`overrides`) ← `--set k=v`."""
    cls = get_method(method).config_class
    values = {k: v for k, v in (recipe or {}).items() if k not in RUN_KEYS}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise UserError(f"{source}: unknown key {key!r} ({_known_keys(cls, str(key))})")
    origin = dict.fromkeys(values, source)  # where each value came from, for error messages
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k], origin[k] = v, "--" + k.replace("_", "-")
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE (--set help lists the options)")
        key, raw = item.split("=", 1)
        values[key.strip()] = _coerce(cls, key.strip(), raw)
        origin[key.strip()] = f"--set {item}"
    config = config_from_dict(cls, values, source)
    _check_types(config, origin, source)
    try:
        config.validate()
    except UserError as exc:  # "lr must be > 0 (got -1.0)": say which flag or file set it
        key = str(exc).split(" ", 1)[0]
        raise UserError(f"{origin.get(key, source)}: {exc}") from None
    return config


def _check_types(config: MethodConfig, origin: dict[str, str], source: str) -> None:
    """Refuse a value of the wrong type (e.g. `lr: fast`) with the key's name."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = getattr(hint, "__args__", (hint,))
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
            continue
        if not any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed
                   if isinstance(t, type)):
            names = "/".join(t.__name__ for t in allowed if isinstance(t, type))
            raise UserError(f"{origin.get(f.name, source)}: {f.name} must be {names} (got {value!r})")


HEADERS = {
    "memoe": "MEMoE: batch editing with knowledge-anchor routing (moecli defaults).",
    "lemoe": "LEMoE: lifelong editing, one expert per batch (moecli defaults: knn anchor store).",
    "scen": "SCEN: one expert per edit, gated by a trained indexing neuron (moecli defaults).",
    "ft": "FT-L: fine-tune the target module's weight directly (baseline).",
    "lora": "LoRA through peft on the target module (baseline).",
    "grace": "GRACE: a codebook at the target layer with a deferral radius (baseline).",
    "wise": "WISE: side memories beside the target FFN down-projection, routed by activation (baseline).",
    "locft": "LocFT-BF: fine-tune one FFN down-projection, breadth-first over the edits so far (baseline).",
}


def _type_name(hint: Any) -> str:
    """`float`, `int | null`: a field's type as a recipe or `--set` writes it."""
    args = getattr(hint, "__args__", None)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _yaml_scalar(value: Any) -> str:
    """A default as a recipe writes it (`null`, `true`, `0.01`, `auto`)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default, made by its factory when it has one (a mutable default)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def describe_options(method: str) -> str:
    """What `--set help` prints: every option of `method`, one a line, as `name (type, default value): help`."""
    cls = get_method(method).config_class
    hints = get_type_hints(cls)
    lines = [f"{method} options (--set KEY=VALUE, or a recipe key):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {_yaml_scalar(_default_of(f))}): "
                     f"{f.metadata['help']}")
    return "\n".join(lines) + "\n"


def help_comment(method: str, key: str) -> list[str]:
    """The comment lines a shipped recipe puts above `key`: the option's help, wrapped."""
    field = next(f for f in dataclasses.fields(get_method(method).config_class) if f.name == key)
    return ["# " + line for line in textwrap.wrap(field.metadata["help"], COMMENT_WIDTH - 2, break_on_hyphens=False,
                                                   break_long_words=False)]


def default_recipe_text(method: str) -> str:
    """The YAML of a method's defaults, each key under its help, as shipped in `assets/recipes/<method>.yaml`
    (a test keeps them equal)."""
    cls = get_method(method).config_class
    source = cls.__module__.replace(".", "/") + ".py"
    lines = [f"# {HEADERS.get(method, method)}", f"# Every key is a field of the method's config dataclass ({source});",
             "# CLI flags (--lr, --layer, --set KEY=VALUE …) override these values; --set help lists them.",
             f"method: {method}"]
    for key, value in dataclasses.asdict(cls()).items():
        lines += [*help_comment(method, key), yaml.safe_dump({key: value}, sort_keys=False).rstrip("\n")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m moecli.engine.recipes: rewrite the shipped <method>.yaml from the defaults
    for name in HEADERS:
        (RECIPES_DIR / f"{name}.yaml").write_text(default_recipe_text(name), encoding="utf-8")
