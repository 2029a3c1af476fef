"""LEMoE and the lifelong loop on a tiny model: routing keeps old edits, resume equals no interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_resume_is_exact

from moecli.data.records import EditRecord, LocalityPair
from moecli.engine.checkpoint import load_checkpoint
from moecli.engine.recipes import build_config
from moecli.engine.run import RunSpec, run_edits
from moecli.model.tiny import make_tiny_model

NAMES = ["Alice Moreau", "Bruno Keller", "Clara Novak", "Daniel Silva", "Elena Rossi", "Felix Okafor"]
CITIES = ["Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Kyoto"]
RECORDS = [
    EditRecord(prompt=f"{n} was born in", target=c, subject=n, rephrases=[f"Where was {n} born?"],
               locality=[LocalityPair("The capital of France is", "Paris", "other")])
    for n, c in zip(NAMES, CITIES)
]
FAST = {"lr": 0.02, "max_steps": 200, "retain": "none"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _spec(tiny_dir: Path, out: Path, router: str = "knn", eval_every: int = 0) -> RunSpec:
    config = build_config("lemoe", overrides={**FAST, "router": router})
    return RunSpec(command="lifelong", method="lemoe", config=config,
                   records=RECORDS, batch_size=2, out_dir=out, model_path=tiny_dir, generation=False,
                   protocol="lifelong", eval_every=eval_every)


def test_knn_lemoe_keeps_every_edit(tiny_dir, tmp_path):
    report = run_edits(_spec(tiny_dir, tmp_path / "run", eval_every=1))
    assert report["summary"]["rel"] == 1.0  # the knn router never forgets an earlier batch
    assert report["summary"]["loc"] == 1.0
    assert [p["step"] for p in report["retention"]] == [1, 2, 3]
    ckpt = load_checkpoint(tmp_path / "run" / "adapter")
    assert ckpt.config["n_experts"] == 3
    assert [e["expert"] for e in ckpt.ledger] == [0, 0, 1, 1, 2, 2]


def test_paper_kv_router_runs(tiny_dir, tmp_path):
    report = run_edits(_spec(tiny_dir, tmp_path / "kv", router="kv"))
    assert report["summary"]["n_edits"] == len(RECORDS)
    assert report["columns"]["after"]["rel"] > report["columns"]["before"]["rel"]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("when", ["after_save", "mid_batch"])
def test_interrupted_run_resumes_to_the_same_adapter(tiny_dir, tmp_path, monkeypatch, when):
    assert_resume_is_exact(lambda out: _spec(tiny_dir, out), tmp_path, monkeypatch, when)
