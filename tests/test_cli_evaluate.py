"""Acceptance tests of `moecli evaluate` and of the CLI's error contract.

Runs go through `moecli.cli.app.main([...])` in-process (fast: torch and transformers are imported
once). The checks of what a user really sees on stderr (exactly one line, no traceback) run the
installed `moecli` entry point in subprocesses, all at once, with COLUMNS=200 so rich cannot wrap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_data

from moecli.cli.app import main
from moecli.model.loading import SUPPORTED_FAMILIES
from moecli.model.tiny import make_tiny_model

ALL_FAMILIES = sorted(SUPPORTED_FAMILIES)
MOECLI = Path(sys.executable).with_name("moecli")
SUMMARY_KEYS = {"rel", "gen", "loc", "avg", "n_edits"}

RECORDS = [
    {
        "prompt": "The capital of France is",
        "target": "Rome",
        "subject": "France",
        "ground_truth": "Paris",
        "rephrases": ["What is the capital of France?"],
        "locality": [
            {"prompt": "The capital of Japan is", "answer": "Tokyo", "group": "same_relation"},
            {"prompt": "The official language of France is", "answer": "French", "group": "same_subject"},
        ],
        "portability": [{"prompt": "The Eiffel Tower is located in", "answer": "Rome"}],
    },
    {
        "prompt": "Marie Curie was born in",
        "target": "Ulm",
        "subject": "Marie Curie",
        "ground_truth": "Warsaw",
        "rephrases": ["The birthplace of Marie Curie is"],
        "locality": [{"prompt": "Ada Lovelace was born in", "answer": "London", "group": "same_relation"}],
    },
    {"prompt": "Shakespeare wrote", "target": "War and Peace", "ground_truth": "Hamlet"},
    {"prompt": "The currency of Japan is", "target": "the pound", "rephrases": ["Japan pays with"]},
    {"prompt": "Mount Fuji is located in", "target": "China", "subject": "Mount Fuji"},
    {"prompt": "Water boils at", "target": "ten degrees"},  # beyond --limit 5
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "edits.jsonl", RECORDS)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), num_layers=2)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `moecli ARGS` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _check_report(out_dir: Path, n_edits: int) -> dict:
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    assert json_path.is_file() and md_path.is_file()
    report = json.loads(json_path.read_text(encoding="utf-8"))
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_edits"] == n_edits == report["n_edits"]
    for key in ("rel", "gen", "loc", "avg"):
        assert summary[key] is None or 0.0 <= summary[key] <= 1.0, key
    assert len(report["per_edit"]) == n_edits
    assert report["command"] == "evaluate"
    md = md_path.read_text(encoding="utf-8")
    assert "| Rel |" in md and "| Avg |" in md
    return report


# ---------------------------------------------------------------- successful runs


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_evaluate_every_family(family: str, tmp_path: Path, data_file: Path, capsys) -> None:
    model = make_tiny_model(family, tmp_path / family, num_layers=2)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(model), "--data", str(data_file), "--limit", "5", "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, stderr
    assert stdout == ""  # --quiet: no table
    assert "Traceback" not in stderr
    report = _check_report(out, 5)
    s = report["summary"]
    assert s["loc"] == 1.0  # no adapter: the model is its own baseline
    assert set(s["loc_by_group"]) == {"same_relation", "same_subject"}
    assert "port" in s and "known" in s and "rel_em" in s
    assert report["format"] == "jsonl"
    assert report["model"] == str(model)
    assert report["data"] == str(data_file)
    assert "| Loc[same_relation] |" in (out / "report.md").read_text(encoding="utf-8")


def test_evaluate_zsre_llama(tmp_path: Path, llama_dir: Path, capsys) -> None:
    zsre = shared_data("zsre_eval_3k.json")
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(zsre), "--limit", "10", "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, stderr
    report = _check_report(out, 10)
    assert report["format"] == "zsre"
    assert report["summary"]["loc_by_group"].keys() == {"nq"}


def test_evaluate_json_prints_one_object(tmp_path: Path, llama_dir: Path, data_file: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(data_file), "--limit", "5", "--out", str(out), "--json"],
        capsys,
    )
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    assert SUMMARY_KEYS <= set(obj)
    assert obj["n_edits"] == 5
    assert set(obj["loc_by_group"]) == {"same_relation", "same_subject"}
    assert obj["avg"] == pytest.approx(sum(obj[k] for k in ("rel", "gen", "loc")) / 3)
    # The printed summary is the report's summary.
    summary = json.loads((out / "report.json").read_text(encoding="utf-8"))["summary"]
    for key in SUMMARY_KEYS:
        assert obj[key] == summary[key]


def test_evaluate_json_without_locality(tmp_path: Path, llama_dir: Path, capsys) -> None:
    data = _write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Shakespeare wrote", "target": "Hamlet"}])
    code, stdout, stderr = run_cli(
        [
            "evaluate",
            "--model",
            str(llama_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--json",
            "--no-generate",
        ],
        capsys,
    )
    assert code == 0, stderr
    obj = json.loads(stdout)
    assert stdout.count("\n") == 1
    assert SUMMARY_KEYS <= set(obj)
    assert "loc_by_group" not in obj
    assert obj["gen"] is None and obj["loc"] is None
    assert obj["avg"] == obj["rel"]
    assert obj["n_edits"] == 1
    assert "rel_em" not in obj  # --no-generate


def test_evaluate_default_output_is_table_and_report_paths(
    tmp_path: Path, llama_dir: Path, data_file: Path, capsys
) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(data_file), "--limit", "2", "--out", str(out)], capsys
    )
    assert code == 0, stderr
    assert "Rel" in stdout and "Loc[same_relation]" in stdout
    assert "report.json" in stderr
    _check_report(out, 2)


def test_evaluate_default_out_dir_is_under_runs(
    tmp_path: Path, llama_dir: Path, data_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--model", str(llama_dir), "--data", str(data_file), "--limit", "1", "--quiet"]
    for _ in range(2):  # a second run in the same second gets its own directory
        code, _, stderr = run_cli(args, capsys)
        assert code == 0, stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("evaluate-") for r in runs)
    for run in runs:
        _check_report(run, 1)


# ---------------------------------------------------------------- bad input, in-process


def _prefilled_out(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    out.mkdir()
    # A user's own files; an --out that already holds a report is refused before anything is read.
    files = {"scores.csv": b"rel,gen\n0.9,0.8\n", "summary.md": b"# my notes\n", "notes.txt": b"keep me\n"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    return out, files


def _assert_untouched(out: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, content in files.items():
        assert (out / name).read_bytes() == content


def _truncated(tmp_path: Path) -> Path:
    text = json.dumps([{"src": "Who wrote Hamlet?", "alt": "Tolstoy", "answers": ["Shakespeare"]}] * 3)
    path = tmp_path / "truncated.json"
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    return path


def _assert_one_error_line(code: int, stdout: str, stderr: str, *needles: str) -> None:
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("moecli: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_data_file(tmp_path: Path, llama_dir: Path, capsys) -> None:
    out, files = _prefilled_out(tmp_path)
    missing = tmp_path / "no-such-file.json"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(missing), "--out", str(out)], capsys
    )
    _assert_one_error_line(code, stdout, stderr, "no-such-file.json", "no such file")
    _assert_untouched(out, files)


def test_truncated_data_file(tmp_path: Path, llama_dir: Path, capsys) -> None:
    out, files = _prefilled_out(tmp_path)
    bad = _truncated(tmp_path)
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(bad), "--out", str(out)], capsys
    )
    _assert_one_error_line(code, stdout, stderr, "truncated.json", "not valid JSON")
    _assert_untouched(out, files)


def test_invalid_record_names_file_and_record(tmp_path: Path, llama_dir: Path, capsys) -> None:
    out, files = _prefilled_out(tmp_path)
    data = _write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"prompt": "Shakespeare wrote", "target": "  "}])
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(llama_dir), "--data", str(data), "--out", str(out)], capsys
    )
    _assert_one_error_line(code, stdout, stderr, "bad.jsonl", "record 2", "empty target")
    _assert_untouched(out, files)


def test_missing_model_dir(tmp_path: Path, data_file: Path, capsys) -> None:
    out, files = _prefilled_out(tmp_path)
    missing = tmp_path / "no-such-model"
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(missing), "--data", str(data_file), "--out", str(out)], capsys
    )
    _assert_one_error_line(code, stdout, stderr, "--model", "no-such-model")
    _assert_untouched(out, files)


def test_model_dir_that_is_not_a_model(tmp_path: Path, data_file: Path, capsys) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, stdout, stderr = run_cli(
        ["evaluate", "--model", str(empty), "--data", str(data_file), "--out", str(tmp_path / "o")], capsys
    )
    _assert_one_error_line(code, stdout, stderr, "empty-model", "config.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "--no-such-option"], "--no-such-option"),
        (["evaluate", "--data", "x.json", "--limit", "0"], "--limit"),
        (["evaluate", "--model", "m"], "--data"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_usage_errors(args: list[str], needle: str, capsys) -> None:
    code, stdout, stderr = run_cli(args, capsys)
    _assert_one_error_line(code, stdout, stderr, needle)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["evaluate", "--help"],
        ["edit", "--help"],
        ["batch-edit", "--help"],
        ["lifelong", "--help"],
        ["plan-order", "--help"],
    ],
)
def test_help_in_process(args: list[str], capsys) -> None:
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "Usage" in stdout
    assert "Traceback" not in stdout + stderr


# ---------------------------------------------------------------- the real entry point
# These run the installed `moecli` in subprocesses. They are started together when the module
# begins (each pays the torch/transformers import, which dominates) so they overlap with the
# in-process tests above, and are checked at the end.

HELP_COMMANDS = [
    [],
    ["--help"],
    ["evaluate", "--help"],
    ["edit", "--help"],
    ["batch-edit", "--help"],
    ["lifelong", "--help"],
    ["plan-order", "--help"],
]


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOECLI_DEBUG", None)
    return subprocess.Popen(
        [str(MOECLI), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=180)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def entry_point_runs(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, data_file: Path):
    """Start every entry-point run at once; yield what the checks need; never leave one running."""
    if not MOECLI.exists():
        yield None
        return
    work = tmp_path_factory.mktemp("entry")
    out, files = _prefilled_out(work)
    truncated = _truncated(work)
    bad = {
        "missing data": (
            ["evaluate", "--model", str(llama_dir), "--data", "no-such-file.json", "--out", str(out)],
            ["no-such-file.json", "no such file"],
        ),
        "truncated data": (
            ["evaluate", "--model", str(llama_dir), "--data", str(truncated), "--out", str(out)],
            ["truncated.json", "not valid JSON"],
        ),
        "missing model": (
            ["evaluate", "--model", str(work / "no-such-model"), "--data", str(data_file), "--out", str(out)],
            ["--model", "no-such-model", "no such file or directory"],
        ),
        "unknown option": (["evaluate", "--frobnicate"], ["--frobnicate"]),
    }
    procs: list[subprocess.Popen] = []
    bad_runs = {}
    for name, (args, needles) in bad.items():
        procs.append(_spawn(args, work))
        bad_runs[name] = (procs[-1], needles)
    help_runs = []
    for args in HELP_COMMANDS:
        procs.append(_spawn(args, work))
        help_runs.append((args, procs[-1]))
    yield {"work": work, "out": out, "files": files, "bad": bad_runs, "help": help_runs}
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.skipif(not MOECLI.exists(), reason="the moecli entry point is not installed in this venv")
def test_entry_point_bad_input_is_one_stderr_line(entry_point_runs) -> None:
    """Each bad input: exit 2, exactly one line on stderr naming the problem, no traceback,
    nothing on stdout, and the --out directory's files untouched."""
    for name, (proc, needles) in entry_point_runs["bad"].items():
        code, stdout, stderr = _finish(proc)
        assert code == 2, (name, stdout, stderr)
        assert "Traceback" not in stdout + stderr, name
        assert stdout == "", name
        assert len(stderr.splitlines()) == 1, (name, stderr)
        assert stderr.startswith("moecli: error: ") and stderr.endswith("\n"), (name, stderr)
        for needle in needles:
            assert needle in stderr, (name, needle, stderr)
    _assert_untouched(entry_point_runs["out"], entry_point_runs["files"])


@pytest.mark.skipif(not MOECLI.exists(), reason="the moecli entry point is not installed in this venv")
def test_entry_point_help(entry_point_runs) -> None:
    for args, proc in entry_point_runs["help"]:
        code, stdout, stderr = _finish(proc)
        assert code == 0, (args, stderr)
        assert "Usage" in stdout, args
        assert "Traceback" not in stdout + stderr
    assert not (entry_point_runs["work"] / "runs").exists()
