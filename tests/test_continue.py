"""Continuing an adapter (`--adapter` on lifelong or batch-edit) is one stream told in two runs: the ledger,
ids, reverts and stream position carry over, and `show` / `ask` / `revert` see every edit, old and new.
What was broken before (issue 32): the continued adapter listed only its new edits, `ask` named a new edit for
an old prompt and `revert` took back the wrong one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, batches_trained, run_moecli

from moecli.cli.app import main
from moecli.engine.checkpoint import load_checkpoint

VIETNAM = "fw0-official_language-Vietnam"
IRENE = "fw0-lives_in-Irene_Dubois"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    return run_moecli(args, capsys)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The reproduction of issue 32: 20 fact-world edits; a lifelong run of 3 batches of 2 (runs/g3), then
    lines 7-10 continued from it in 2 more batches (runs/g2b)."""
    root = tmp_path_factory.mktemp("continue")
    old = os.getcwd()
    os.chdir(root)
    try:
        main(["world", "export", "--n", "20", "--out", "edits.jsonl"])
        lines = Path("edits.jsonl").read_text().splitlines(keepends=True)
        Path("next4.jsonl").write_text("".join(lines[6:10]))
        for args in (["lifelong", "--data", "edits.jsonl", "--batch-size", "2", "--steps", "3", "--out", "runs/g3"],
                     ["lifelong", "--data", "next4.jsonl", "--batch-size", "2", "--adapter", "runs/g3",
                      "--out", "runs/g2b"]):
            try:
                main(["--threads", "1", *args, "--quiet", "--no-generate"])
            except SystemExit as exc:
                assert not exc.code
        yield root
    finally:
        os.chdir(old)


def _ids(lines: list[str]) -> list[str]:
    return [json.loads(line)["id"] for line in lines]


def _ask(capsys, adapter: str, *prompts: str) -> dict[str, dict]:
    code, out, err = run(["ask", "--adapter", adapter, *prompts, "--json"], capsys)
    assert code == 0, err
    return {row["prompt"]: row for row in json.loads(out)}


def test_show_lists_every_edit_old_and_new_with_the_history(work, capsys):
    code, out, err = run(["show", "runs/g2b", "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    lines = (work / "edits.jsonl").read_text().splitlines()
    assert [e["id"] for e in shown["edits"]] == _ids(lines[:10])
    assert [e["batch"] for e in shown["edits"]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # the stream goes on
    assert shown["n_edits"] == 10 and shown["method"] == "lemoe"
    ckpt = load_checkpoint(work / "runs" / "g2b")
    assert ckpt.config["n_experts"] == 5  # one expert per batch, old and new
    assert [h["n_edits"] for h in shown["history"]] == [6] and shown["history"][0]["command"] == "lifelong"
    old = load_checkpoint(work / "runs" / "g3")
    assert ckpt.ledger[:6] == old.ledger  # the old rows, unchanged


def test_ask_names_the_edit_each_prompt_reached(work, capsys):
    rows = _ask(capsys, "runs/g2b", "Irene Dubois lives in", "The official language of Vietnam is")
    assert rows["Irene Dubois lives in"]["route"]["id"] == IRENE
    assert rows["Irene Dubois lives in"]["edited"] == "Milan"
    assert rows["The official language of Vietnam is"]["route"]["id"] == VIETNAM


def test_revert_takes_back_the_named_edit_old_or_new(work, capsys, tmp_path):
    shutil.copytree(work / "runs" / "g2b", tmp_path / "g")
    adapter = str(tmp_path / "g")
    before = _ask(capsys, adapter, "The official language of Vietnam is")["The official language of Vietnam is"]
    assert before["edited"] != before["base"]
    code, _, err = run(["revert", adapter, "--id", VIETNAM], capsys)
    assert code == 0, err
    rows = _ask(capsys, adapter, "The official language of Vietnam is", "Irene Dubois lives in")
    vietnam = rows["The official language of Vietnam is"]
    assert vietnam["edited"] == vietnam["base"] and vietnam["route"] is None
    assert rows["Irene Dubois lives in"]["edited"] == "Milan"  # the old edit stays
    code, _, err = run(["revert", adapter, "--id", IRENE], capsys)  # an edit of the first run can be reverted
    assert code == 0, err
    irene = _ask(capsys, adapter, "Irene Dubois lives in")["Irene Dubois lives in"]
    assert irene["edited"] == irene["base"] == "Hanoi"
    reverted = [e["id"] for e in load_checkpoint(adapter).ledger if e.get("reverted")]
    assert reverted == [IRENE, VIETNAM]


def test_a_continued_run_resumes_where_its_own_part_stopped(work, capsys, monkeypatch, tmp_path):
    """Ctrl-C in the first optimiser step after the continued run's own first save (between two saves):
    `--resume` trains only the batches it lacks, with the old edits and the stream position it started from,
    and ends with the adapter the uninterrupted continuation made, tensor by tensor and row by row."""
    out = tmp_path / "c"
    manifest = out / "adapter" / "manifest.json"
    with monkeypatch.context() as patch:
        for cls in (torch.optim.Adam, torch.optim.AdamW):
            def step(self, *a, _real=cls.step, **k):
                if manifest.exists():
                    raise KeyboardInterrupt
                return _real(self, *a, **k)

            patch.setattr(cls, "step", step)
        code, _, err = run(["--threads", "1", "lifelong", "--data", str(work / "next4.jsonl"), "--batch-size", "2",
                            "--adapter", str(work / "runs" / "g3"), "--out", str(out), "--quiet", "--no-generate"],
                           capsys)
    assert code == 130, err
    stream = load_checkpoint(out).manifest["stream"]
    assert (stream["position"], stream["batch_offset"]) == (1, 3)  # this run's first batch, after the old 3
    with batches_trained(monkeypatch) as trained:
        code, _, err = run(["--threads", "1", "lifelong", "--resume", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert trained == [4]
    assert_same_adapter(load_checkpoint(out), load_checkpoint(work / "runs" / "g2b"))


def test_batch_edit_continues_an_adapter_the_same_way(work, capsys, tmp_path):
    lines = (work / "edits.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "b.jsonl").write_text("".join(lines[10:13]))
    for data, extra in (("a.jsonl", []), ("b.jsonl", ["--adapter", str(tmp_path / "a")])):
        code, _, err = run(["batch-edit", "--data", str(tmp_path / data), "--batch-size", "3", *extra,
                            "--out", str(tmp_path / data[0]), "--no-generate", "--quiet"], capsys)
        assert code == 0, err
    code, out, _ = run(["show", str(tmp_path / "b"), "--json"], capsys)
    shown = json.loads(out)
    assert [e["id"] for e in shown["edits"]] == _ids(lines[:3] + lines[10:13]) and shown["method"] == "memoe"
    assert [e["batch"] for e in shown["edits"]] == [0, 0, 0, 1, 1, 1]
    first = json.loads(lines[0])
    code, _, err = run(["revert", str(tmp_path / "b"), "--id", first["id"]], capsys)
    assert code == 0, err
    row = _ask(capsys, str(tmp_path / "b"), first["prompt"])[first["prompt"]]
    assert row["edited"] == row["base"] and row["route"] is None


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--method", "memoe"], ["--method memoe", "is a lemoe adapter", "--method lemoe"]),
        (["--lr", "0.5"], ["is continued with the options it was made with", "drop --lr"]),
        (["--set", "max_steps=2"], ["drop --set"]),
    ],
    ids=["another-method", "new-lr", "new-set"],
)
def test_continuing_with_other_options_is_refused_in_one_line(work, capsys, tmp_path, extra, needles):
    code, out, err = run(["lifelong", "--data", str(work / "next4.jsonl"), "--batch-size", "2", "--adapter",
                          str(work / "runs" / "g3"), *extra, "--out", str(tmp_path / "x"), "--no-generate"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "x").exists()


def test_an_edit_the_adapter_already_holds_is_refused(work, capsys, tmp_path):
    """Line 1 (Irene Dubois) is in runs/g3: a second copy would make `revert --id` ambiguous."""
    code, out, err = run(["lifelong", "--data", str(work / "edits.jsonl"), "--limit", "2", "--batch-size", "2",
                          "--adapter", str(work / "runs" / "g3"), "--out", str(tmp_path / "x"), "--no-generate"],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and IRENE in err, err
    assert not (tmp_path / "x").exists()
