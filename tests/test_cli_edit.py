"""The editing commands end to end through the CLI on a tiny model (wiring, files, exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecli.cli.app import main
from moecli.data.readers import write_jsonl
from moecli.data.records import EditRecord, LocalityPair
from moecli.errors import UserError
from moecli.model.tiny import make_tiny_model

FAST = ["--set", "max_steps=100", "--set", "lr=0.02", "--set", "retain=none", "--no-generate"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model("llama", root / "m")
    names = ["Alice Moreau", "Bruno Keller", "Clara Novak", "Daniel Silva"]
    recs = [EditRecord(prompt=f"{n} was born in", target=c, subject=n, rephrases=[f"Where was {n} born?"],
                       locality=[LocalityPair("The capital of France is", "Paris", "other")])
            for n, c in zip(names, ["Tokyo", "Lima", "Cairo", "Oslo"])]
    data = root / "edits.jsonl"
    write_jsonl(recs, data)
    return root, model, data


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_edit_from_flags_writes_adapter_and_json(env, tmp_path, capsys):
    _, model, _ = env
    code, out, _ = run(["edit", "--model", str(model), "--prompt", "Alice Moreau was born in", "--target", "Tokyo",
                        "--subject", "Alice Moreau", "--out", str(tmp_path / "e"), "--json", *FAST], capsys)
    assert code == 0
    summary = json.loads(out)
    assert {"rel", "gen", "loc", "avg", "n_edits"} <= summary.keys() and summary["rel"] == 1.0
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "ledger.jsonl"):
        assert (tmp_path / "e" / "adapter" / name).is_file()
    assert (tmp_path / "e" / "report.json").is_file() and (tmp_path / "e" / "report.md").is_file()


def test_batch_edit_then_evaluate_adapter_matches(env, tmp_path, capsys):
    _, model, data = env
    code, out, _ = run(["batch-edit", "--model", str(model), "--data", str(data), "--batch-size", "2",
                        "--out", str(tmp_path / "b"), "--json", *FAST], capsys)
    assert code == 0
    after = json.loads(out)
    code, out, _ = run(["evaluate", "--model", str(model), "--data", str(data), "--adapter", str(tmp_path / "b"),
                        "--out", str(tmp_path / "ev"), "--json", "--no-generate"], capsys)
    assert code == 0 and json.loads(out) == after


def test_lifelong_planned_with_retention_and_resume_of_finished_run(env, tmp_path, capsys):
    _, model, data = env
    out_dir = tmp_path / "l"
    code, _, _ = run(["lifelong", "--model", str(model), "--data", str(data), "--batch-size", "2", "--order",
                      "planned", "--eval-every", "1", "--out", str(out_dir), "--quiet", *FAST], capsys)
    assert code == 0
    assert (out_dir / "retention.png").is_file()
    report = json.loads((out_dir / "report.json").read_text())
    assert report["order"] == "planned" and len(report["retention"]) == 2
    code, _, _ = run(["lifelong", "--resume", str(out_dir), "--quiet"], capsys)
    assert code == 0
    # a second fresh run into the same --out is refused: the first run's adapter is not overwritten
    code, _, err = run(["lifelong", "--model", str(model), "--data", str(data), "--out", str(out_dir), *FAST], capsys)
    assert code == 2 and "already holds an adapter" in err


def test_plan_order_writes_planned_file(env, tmp_path, capsys):
    _, model, data = env
    code, out, _ = run(["plan-order", "--model", str(model), "--data", str(data), "--batch-size", "2",
                        "--out", str(tmp_path / "p.jsonl"), "--json"], capsys)
    assert code == 0
    stats = json.loads(out)
    assert {"planned", "file"} <= stats.keys()
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(x["batch"] for x in lines) == [0, 0, 1, 1]


@pytest.mark.parametrize("args, needle", [
    (["--set", "bogus=1"], "bogus"),
    (["--set", "lr=-1"], "lr"),
    (["--method", "nope"], "nope"),
    (["--expert-form", "huge"], "expert_form"),
])
def test_bad_options_exit_2(env, tmp_path, capsys, args, needle):
    _, model, data = env
    code, _, err = run(["batch-edit", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "x"),
                        *args], capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unknown_recipe_key_refused(env, tmp_path, capsys):
    _, model, data = env
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: memoe\nn_expert: 4\n")
    code, _, err = run(["batch-edit", "--model", str(model), "--data", str(data), "--recipe", str(recipe),
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "n_expert" in err


def test_shipped_recipes_equal_the_defaults():
    import dataclasses

    import yaml

    from moecli.methods import get_method

    root = Path(__file__).resolve().parents[1] / "moecli" / "assets" / "recipes"
    for name in ("memoe", "lemoe", "scen", "ft", "lora", "grace"):
        recipe = yaml.safe_load((root / f"{name}.yaml").read_text())
        assert recipe.pop("method") == name
        assert recipe == dataclasses.asdict(get_method(name).config_class()), name


def test_every_shipped_recipe_builds_a_valid_config():
    from moecli.engine.recipes import build_config, read_recipe

    for path in sorted((Path(__file__).resolve().parents[1] / "moecli" / "assets" / "recipes").glob("*.yaml")):
        recipe = read_recipe(path)
        build_config(recipe["method"], recipe, source=str(path))


def test_a_shipped_recipe_is_found_by_name_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    """`--recipe lemoe-paper` needs no path (the recipes ship inside the package); a file of that name in the
    working directory still wins; an unknown name says which recipes exist."""
    from moecli.engine.recipes import read_recipe

    monkeypatch.chdir(tmp_path)
    assert read_recipe("lemoe-paper")["router"] == "kv"
    (tmp_path / "lemoe-paper").write_text("method: memoe\n")
    assert read_recipe("lemoe-paper") == {"method": "memoe"}
    with pytest.raises(UserError, match=r"--recipe lemoi: no such file \(or a shipped recipe: .*lemoe-paper"):
        read_recipe("lemoi")
