"""Method configuration: every option carries its help, `layer_fraction` is one option with one check, the
bypass is built in one call from what a method settles, the wrapped layers share one protocol, and the help
reaches the user (`--set help`, the shipped recipes' comments)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml
from conftest import run_moecli
from torch import nn

from moecli.adapter.bypass import BypassOptions, MoEBypass, WrappedLayer
from moecli.engine.recipes import RECIPES_DIR, build_config, default_recipe_text, describe_options, read_recipe
from moecli.errors import UserError
from moecli.methods import METHOD_NAMES, get_method
from moecli.methods.base import LAYER_FRACTION_HELP, MethodConfig
from moecli.methods.grace import GraceLayer
from moecli.methods.wise import WiseLayer
from moecli.model.loading import load_model
from moecli.model.tiny import make_tiny_model
from moecli.routing.context import AnchorContext

LAYER_FRACTIONS = {"memoe": 0.85, "lemoe": 0.85, "scen": 0.85, "ft": 0.56, "lora": 0.56, "grace": 0.56,
                   "locft": 0.71, "wise": 0.87}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_option_of_every_method_has_a_help(method):
    for f in dataclasses.fields(get_method(method).config_class):
        assert f.metadata.get("help", "").strip(), f"{method}.{f.name} has no help"


def test_layer_fraction_is_one_option_with_one_check_and_each_method_records_its_default():
    assert {f.name: f.default for f in dataclasses.fields(MethodConfig)}["layer_fraction"] == 0.85
    assert set(LAYER_FRACTIONS) == set(METHOD_NAMES)
    for method, fraction in LAYER_FRACTIONS.items():
        cls = get_method(method).config_class
        recorded = dataclasses.asdict(cls())["layer_fraction"]  # what adapter_config.json and run.json hold
        assert type(recorded) is float and recorded == fraction, method
        help_text = next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == "layer_fraction")
        assert help_text.startswith(LAYER_FRACTION_HELP) and f"default {fraction}" in help_text, method
        with pytest.raises(UserError, match="layer_fraction"):
            build_config(method, overrides={"layer_fraction": 1.5})
        assert build_config(method, sets=["layer_fraction=1"]).layer_fraction == 1.0
    classes = {c for m in METHOD_NAMES for c in get_method(m).config_class.__mro__ if issubclass(c, MethodConfig)}
    checking = [c.__name__ for c in classes
                if "validate" in vars(c) and "layer_fraction" in vars(c)["validate"].__code__.co_names]
    assert checking == ["MethodConfig"]  # the range check is written once


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shipped_default_recipe_is_the_defaults_each_under_its_help(method):
    text = (RECIPES_DIR / f"{method}.yaml").read_text(encoding="utf-8")
    assert text == default_recipe_text(method)  # regenerate with `python -m moecli.engine.recipes`
    recipe = yaml.safe_load(text)
    assert recipe.pop("method") == method
    assert recipe == dataclasses.asdict(get_method(method).config_class())


def _comments_above_keys(text: str) -> dict[str, str]:
    """Each top-level key of a recipe with the full-line comments just above it, joined."""
    found, comments = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        key = re.match(r"^(\w+):", line)
        if key:
            found[key.group(1)] = " ".join(comments)
        comments = []
    return found


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_key_of_a_shipped_recipe_is_an_option_with_its_help_above_it(path):
    recipe = read_recipe(path)
    fields = {f.name: f for f in dataclasses.fields(get_method(recipe["method"]).config_class)}
    comments = _comments_above_keys(path.read_text(encoding="utf-8"))
    assert set(comments) == set(recipe)
    for key in recipe:
        if key == "method":
            continue
        assert key in fields, f"{path.name}: {key} is no option of {recipe['method']}"
        assert comments[key].split() == fields[key].metadata["help"].split(), f"{path.name}: {key}"




@pytest.mark.parametrize(("args", "method"), [
    (["edit", "--set", "help", "--method", "lora"], "lora"),
    (["edit", "--method", "grace", "--set", "?"], "grace"),
    (["batch-edit", "--set", "help", "--recipe", "scen-paper"], "scen"),  # no --data needed
    (["lifelong", "--set", "lr=0.1", "--set", "help"], "lemoe"),
    (["batch-edit", "--set", "help"], "memoe"),
])
def test_set_help_lists_the_chosen_methods_options_and_exits_0(capsys, args, method):
    code, out, err = run_moecli(args, capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{method} options")
    fields = dataclasses.fields(get_method(method).config_class)
    assert len(lines) == 1 + len(fields)
    for line, f in zip(lines[1:], fields):
        assert line.strip().startswith(f"{f.name} (") and line.endswith(f.metadata["help"])
    assert out == describe_options(method)


def test_edit_help_tells_of_set_help(capsys):
    code, out, _ = run_moecli(["edit", "--help"], capsys)
    assert code == 0 and "--set help" in " ".join(out.replace("│", " ").split())


def test_set_help_with_an_unknown_method_is_a_one_line_error(capsys):
    code, _, err = run_moecli(["edit", "--set", "help", "--method", "nope"], capsys)
    assert code == 2 and "nope" in err


def test_the_three_wrapped_layers_are_wrapped_layers():
    base = nn.Linear(4, 3)
    layers = [MoEBypass(base, 4, 3, nn.Identity(), AnchorContext()), GraceLayer(base, 4, 3, AnchorContext()),
              WiseLayer(base, 4, 3, AnchorContext(), 0.88)]
    assert not isinstance(base, WrappedLayer)
    for layer in layers:
        assert isinstance(layer, WrappedLayer), type(layer).__name__
        assert layer.base is base and layer.enabled and layer.matcher is None
        x = torch.randn(2, 5, 4)
        assert torch.equal(layer(x), base(x))  # nothing learned yet: the base output exactly


def test_a_bypass_is_built_in_one_call():
    generator = torch.Generator().manual_seed(0)
    bypass = MoEBypass(nn.Linear(4, 3), 4, 3, nn.Identity(), AnchorContext(),
                       BypassOptions(expert_form="lowrank", rank=2, experts=3, unmatched_get_nothing=True), generator)
    assert len(bypass.experts) == 3 and bypass.experts[0].A.shape == (2, 4) and bypass.unmatched_get_nothing
    assert bypass.scope is None and bypass.matcher is None and not bypass.key_substitution


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model("llama", tmp_path_factory.mktemp("configs") / "m"))


@pytest.mark.parametrize(("method", "sets"), [
    ("memoe", []), ("memoe", ["scope=false", "null_route=false"]), ("lemoe", []), ("lemoe", ["router=kv"]),
    ("scen", []), ("scen", ["scope=false"]),
])
def test_bypass_methods_build_their_bypass_from_their_config(tiny, method, sets):
    config = build_config(method, sets=["query_feature=input", *sets])
    m = get_method(method)(tiny, config, seed=0)
    try:
        b, c = m.bypass, config
        assert b.matcher is m.matcher and b.key_substitution == (m.matcher is not None and c.key_substitution)
        assert (b.expert_form, b.rank, b.scale, b.positions) == (c.expert_form, c.rank, c.scale, c.positions)
        if method == "memoe":
            assert len(b.experts) == c.n_experts and b.scope is (m.matcher if c.scope else None)
            assert b.unmatched_get_nothing == c.null_route and (m.matcher is not None) == c.scope
        elif method == "lemoe":
            assert b.unmatched_get_nothing == c.null_route and (m.matcher is not None) == (c.router == "knn")
        else:
            assert b.unmatched_get_nothing == c.scope and b.router.scope is m.matcher
            assert (m.matcher is not None) == c.scope
    finally:
        m.remove()


def test_the_method_files_hold_no_measurements_in_their_option_help():
    """Figures and history belong in docs/design.md; an option's help says what it does and why."""
    for method in METHOD_NAMES:
        for f in dataclasses.fields(get_method(method).config_class):
            assert not re.search(r"Gen \d|→|SmolLM2", f.metadata["help"]), f"{method}.{f.name}"


def test_every_bypass_training_option_reaches_the_training_loop():
    """An option the training loop never sees does nothing: `retain_weight` once did not reach it."""
    from moecli.methods.lemoe import LEMoEConfig

    config = LEMoEConfig(retain="swap", retain_weight=0.25, lr=0.5, max_steps=7, stop_prob=0.5, eos_target=False)
    train = config.train_config()
    assert (train.retain_weight, train.lr, train.max_steps, train.stop_prob, train.eos_target) == (
        0.25, 0.5, 7, 0.5, False)
