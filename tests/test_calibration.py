"""The calibration data moecli ships and the automatic question key: `calibrate` without `--data`, the first
editing run on a model without a key calibrating one (once: the next run reuses the cached file), the switch
that skips it, and the models it must not run on (the fact world, the test models)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_moecli, shared_data

from moecli.data.readers import read_records
from moecli.engine import calibration
from moecli.engine.calibration import SHIPPED, Source
from moecli.errors import UserError
from moecli.paths import ASSETS
from moecli.routing.question import find_encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fact-world records: 40 to calibrate on (gzip JSON lines, as a shipped file), 4 others to edit."""
    root = tmp_path_factory.mktemp("calibration")
    old = os.getcwd()
    os.chdir(root)
    try:
        from moecli.cli.app import main

        try:
            main(["world", "export", "--n", "44", "--out", "all.jsonl"])
        except SystemExit as exc:
            assert not exc.code
        lines = (root / "all.jsonl").read_text().splitlines()
        (root / "train.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[:40]) + "\n").encode()))
        (root / "edit.jsonl").write_text("\n".join(lines[40:]) + "\n")
        yield root
    finally:
        os.chdir(old)


@pytest.fixture
def small_world_key(world, tmp_path, monkeypatch):
    """The automatic calibration allowed on the fact world (any vocabulary) and reading its 40 train records
    instead of the shipped files, in a fresh cache; counts the calibrations."""
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "MIN_VOCAB", 0)
    monkeypatch.setattr(calibration, "SHIPPED", (Source("world", str(world / "train.jsonl.gz"), 0, 40),))
    calls = []
    real = calibration.calibrate_shipped

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate_shipped", counted)
    return calls


def _edit(world, out: Path, capsys, *extra: str) -> tuple[dict, str]:
    code, _, err = run_moecli(["batch-edit", "--data", str(world / "edit.jsonl"), "--batch-size", "4", "--out",
                               str(out), "--no-generate", *extra], capsys)
    assert code == 0, err
    return json.loads((out / "run.json").read_text()), err


def test_first_run_calibrates_a_key_and_the_next_reuses_it(world, tmp_path, small_world_key, capsys):
    run, err = _edit(world, tmp_path / "a", capsys)
    key = run["question_key"]
    assert key["source"] == "calibrated-now" and key["seconds"] > 0 and key["records"] == 40
    assert Path(key["path"]).is_file() and Path(key["path"]).parent == tmp_path / "cache" / "questions"
    assert run["config"]["query_feature"] == "learned" and run["config"]["question_encoder"] == key["path"]
    assert len(small_world_key) == 1
    assert len(re.findall("calibrating one from the shipped train data", err)) == 1 and "about" in err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["question_key"]["source"] == "calibrated-now"
    stamp = Path(key["path"]).stat().st_mtime_ns

    again, err = _edit(world, tmp_path / "b", capsys)
    assert again["question_key"] == {"source": "cache", "path": key["path"]}
    assert len(small_world_key) == 1 and "calibrating" not in err  # not calibrated again
    assert Path(key["path"]).stat().st_mtime_ns == stamp
    assert again["config"]["question_encoder"] == key["path"]


def test_an_automatic_key_from_older_defaults_is_set_aside_and_a_users_key_is_kept(world, tmp_path, small_world_key,
                                                                                     monkeypatch, capsys):
    """After an upgrade changes the default calibration data, the key the automatic path made from the old defaults
    no longer shadows a better one: it is renamed `*.outdated` and the run calibrates again (or takes the shipped
    key); a key the user made with `moecli calibrate` stays the model's key whatever the defaults."""
    run, _ = _edit(world, tmp_path / "a", capsys)
    path = Path(run["question_key"]["path"])
    monkeypatch.setattr(calibration, "SHIPPED", (Source("world", str(world / "train.jsonl.gz"), 0, 36),))
    again, _ = _edit(world, tmp_path / "b", capsys)
    key = again["question_key"]
    assert key["source"] == "calibrated-now" and key["path"] == str(path) and len(small_world_key) == 2
    aside = path.with_suffix(".outdated")
    assert key["outdated_key_set_aside"] == str(aside) and aside.is_file()
    third, _ = _edit(world, tmp_path / "c", capsys)
    assert third["question_key"] == {"source": "cache", "path": str(path)} and len(small_world_key) == 2

    code, _, err = run_moecli(["calibrate", "--records", "0:40"], capsys)  # the user's own, installed
    assert code == 0, err
    monkeypatch.setattr(calibration, "SHIPPED", (Source("world", str(world / "train.jsonl.gz"), 0, 32),))
    fourth, _ = _edit(world, tmp_path / "d", capsys)
    assert fourth["question_key"] == {"source": "cache", "path": str(path)} and len(small_world_key) == 2


def test_auto_calibrate_false_skips_it(world, tmp_path, small_world_key, capsys):
    run, err = _edit(world, tmp_path / "a", capsys, "--set", "auto_calibrate=false")
    assert run["question_key"] == {"source": "none", "reason": "auto_calibrate is off"}
    assert run["config"]["query_feature"] == "output" and not small_world_key and "calibrating" not in err
    assert not (tmp_path / "cache" / "questions").exists()
    run, _ = _edit(world, tmp_path / "b", capsys, "--set", "query_feature=input")  # a test named: no key either
    assert run["question_key"]["source"] == "none" and not small_world_key


def test_fact_world_and_test_models_are_never_calibrated(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated a key for the fact world")

    monkeypatch.setattr(calibration, "calibrate_shipped", refuse)
    run, _ = _edit(world, tmp_path / "a", capsys)
    assert run["question_key"]["source"] == "none" and "vocabulary of" in run["question_key"]["reason"]
    assert run["config"]["query_feature"] == "output"


def test_calibrate_without_data_or_out_installs_a_key_from_the_shipped_data(world, tmp_path, small_world_key,
                                                                           capsys):
    code, out, err = run_moecli(["calibrate", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["sources"] == ["shipped:train[0:40]"] and info["records"] == 40
    assert Path(info["installed"]).parent == tmp_path / "cache" / "questions"
    assert set(info["per_source"]) == {"shipped:train[0:40]"}
    from moecli.model.loading import load_model
    from moecli.world import default_model_dir

    assert find_encoder(load_model(default_model_dir()).model) == Path(info["installed"])
    code, out, err = run_moecli(["calibrate", "--records", "0:20", "--out", str(tmp_path / "q.safetensors"),
                                 "--no-text"], capsys)
    assert code == 0, err
    assert (tmp_path / "q.safetensors").is_file() and "shipped:train[0:20]" in err
    code, _, err = run_moecli(["calibrate", "--records", "0:20", "--records", "0:10"], capsys)
    assert code == 2 and "one START:END per shipped file" in err


def test_gzip_record_files_read_like_plain_ones(world, tmp_path):
    plain = read_records(world / "all.jsonl").records[:40]
    assert read_records(world / "train.jsonl.gz").records == plain
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(json.dumps([r.to_dict() for r in plain]).encode()))
    assert read_records(tmp_path / "list.json.gz", "jsonl").records == plain
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a valid gzip file"):
        read_records(tmp_path / "bad.json.gz")


def test_the_shipped_files_are_in_the_package_data_and_described():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = ASSETS.parent  # the package directory
    patterns = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "moecli"]
    packaged = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    sources = (calibration.CALIBRATION_DIR / "SOURCES.md").read_text()
    for src in SHIPPED:
        assert src.path in packaged and src.path.name in sources
    assert calibration.CALIBRATION_DIR / "SOURCES.md" in packaged
    assert "zsre_eval" not in " ".join(s.file for s in SHIPPED)  # an evaluation split is never calibrated on


@pytest.mark.parametrize("src", SHIPPED, ids=lambda s: s.name)
def test_the_shipped_records_are_the_originals(src):
    """Trimmed to the fields calibration reads, the same records in the same order; SOURCES.md gives the
    originals' sha256."""
    original = shared_data(f"{src.name}.json")
    assert hashlib.sha256(original.read_bytes()).hexdigest() in (calibration.CALIBRATION_DIR / "SOURCES.md").read_text()
    ours = read_records(src.path, skip_invalid=True)
    theirs = read_records(original, skip_invalid=True, limit=len(ours.records))
    assert len(ours.records) >= src.end - 2 and ours.format == theirs.format
    for a, b in zip(ours.records, theirs.records):
        assert (a.prompt, a.target, a.subject, a.ground_truth, a.rephrases, a.id) == (
            b.prompt, b.target, b.subject, b.ground_truth, b.rephrases, b.id)
        assert a.locality == [lp for lp in b.locality if lp.group == "neighborhood"]  # ZsRE's nq prompts dropped
