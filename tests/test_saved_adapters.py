"""Adapters saved by an earlier release load in this one and give the same answers: the fixture in
`tests/data/adapters_0_1_0` (made by its `make.py` before the package moved into subpackages) holds one
adapter per method, trained on ten fact-world edits, with each edited model's greedy answers and last-token
logits on 20 prompts (edit prompts, rephrasings, locality prompts)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import run_moecli
from safetensors.torch import load_file

from moecli.world import default_model_dir

FIXTURE = Path(__file__).parent / "data" / "adapters_0_1_0"
METHODS = ["lemoe", "memoe", "scen", "grace", "lora"]


def _maker():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_saved_by_the_previous_release_answers_as_it_did(method, capsys):
    prompts = json.loads((FIXTURE / "prompts.json").read_text())
    before = json.loads((FIXTURE / f"{method}.answers.json").read_text())
    assert sum(row["edited"] != row["base"] for row in before) >= 5  # the fixture holds edits that show
    code, out, err = run_moecli(["ask", "--adapter", str(FIXTURE / method), "--model", str(default_model_dir()),
                                 "--json", "--max-new-tokens", "6", *prompts], capsys)
    assert code == 0, err
    assert json.loads(out) == before
    logits = _maker().last_logits(FIXTURE / method, prompts)
    torch.testing.assert_close(logits, load_file(str(FIXTURE / f"{method}.logits.safetensors"))["logits"],
                               rtol=1e-5, atol=1e-4)  # thread counts reorder sums
