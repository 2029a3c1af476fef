"""What the commands print and check around a job: progress bars, metric tables, JSON output, the `--out`
checks and the `--fail-under` / `--junit` gates."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moecli.errors import RunError, UserError

err_console = Console(stderr=True)


out_console = Console()


class Interrupted(RunError):
    """Ctrl-C during a run; the message says what is saved and how to finish. Exit code 130 (128 + SIGINT)."""

    exit_code = 130


@contextmanager
def progress_reporter(enabled: bool):
    """Yield a `progress(stage, done, total)` callback drawing rich bars on stderr (or a no-op)."""
    if not enabled or not err_console.is_terminal:  # bars in a log file would only add blank lines
        def silent(*a, **k) -> None:
            pass

        if enabled:  # a log file gets the notes, not the bars
            silent.note = note
        yield silent
        return
    bars = Progress(
        TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    report.note = note  # one line about what is going on (e.g. a question key being calibrated)
    with bars:
        yield report


def note(text: str) -> None:
    """One stderr line from inside a run (through `progress.note`: `--quiet` and `--json` silence it)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def resolve_model_path(model: str | None, quiet: bool = False) -> Path:
    """The `--model` directory (a GGUF file or a packaged model's name converted once, with a progress
    bar), or the embedded fact-world model (built on first use if needed)."""
    with progress_reporter(not quiet) as progress:
        if model:
            from moecli.model.sources import resolve_model

            return resolve_model(model, progress)
        from moecli.world import default_model_dir

        return default_model_dir(progress=progress)


def default_out_dir(command: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{command}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{command}-{stamp}-{n}"
    return out


def print_metrics(columns: dict[str, dict], title: str) -> None:
    """A rich table: one row per metric, one column per model state (before / after …)."""
    from rich.markup import escape

    from moecli.engine.reports import metric_rows

    # Labels such as "Loc[nq]" and model names are text, not rich markup (which would eat "[nq]").
    table = Table(title=escape(title))
    table.add_column("metric")
    for name in columns:
        table.add_column(escape(name), justify="right")
    for label, cells in metric_rows(columns):
        table.add_row(escape(label), *cells)
    out_console.print(table)


def emit_json(summary: dict) -> None:
    """Print the public summary as one JSON object on stdout (the contract scripts rely on)."""
    from moecli.engine.reports import public_summary

    sys.stdout.write(json.dumps(public_summary(summary)) + "\n")


def load_records(data: Path | None, fmt: str | None, skip_invalid: bool, limit: int | None, same_subject: int = 0,
                 what: str = "valid records"):
    """Read --data as every job does (`engine.prepare.read_edit_records`), with one stderr line for what
    --skip-invalid left out and one for the neighbourhood probes dropped."""
    from moecli.engine.prepare import read_edit_records

    if data is None:
        raise UserError("--data FILE is required (or --prompt/--target for one edit)")
    prepared = read_edit_records(data, fmt, skip_invalid=skip_invalid, limit=limit, same_subject=same_subject,
                                 what=what)
    if prepared.read.skipped:
        err_console.print(_skipped_line(prepared.read), markup=False, highlight=False, soft_wrap=True)
    if prepared.dropped:
        err_console.print(f"{data}: {prepared.dropped} neighborhood probes ask another record's edited fact; not "
                          "scored as locality", markup=False, highlight=False, soft_wrap=True)
    return prepared.read


def _skipped_line(read) -> str:
    """One stderr line for --skip-invalid: how many records were left out, and the first reason."""
    return f"moecli: skipped {read.skipped} invalid records (the first: {read.problems[0]})"


def check_out_dir(out: Path, option: str = "--out") -> None:
    """Refuse an output directory moecli cannot or must not write, before anything runs: a file, an
    unwritable place, or a place inside a checkpoint (a later save or revert of that checkpoint would
    replace the whole directory, and the run with it)."""
    from moecli.engine.checkpoint import inside_checkpoint

    holder = inside_checkpoint(out)
    if holder is not None:
        shown = os.path.relpath(holder) if holder.is_relative_to(Path.cwd()) else holder  # as the user wrote it
        raise UserError(f"{option} {out}: is inside the adapter checkpoint {shown}; a save or revert of it would "
                        f"delete this run; pick a directory outside it")
    missing = []
    existing = out
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {out}: {existing} is a file, not a directory")
    try:  # tried for real (permissions say nothing to root, nor of a read-only mount), then undone
        for d in reversed(missing):
            d.mkdir()
        probe = out / f".moecli-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for d in missing:
            with contextlib.suppress(OSError):
                d.rmdir()


def check_gates(report: dict, gates: dict[str, float], junit: Path | None) -> None:
    """`--junit` and `--fail-under` after a run: the XML file, then one stderr line per shortfall, exit 1."""
    from moecli.engine.reports import shortfalls, write_junit

    if junit is not None:
        try:
            write_junit(junit, report, gates)
        except OSError as exc:
            raise RunError(f"--junit {junit}: cannot write it: {exc.strerror or exc}") from exc
    short = shortfalls(report["summary"], gates)
    if short:
        for line in short:
            err_console.print(f"moecli: fail-under: {line}", markup=False, highlight=False)
        raise typer.Exit(1)


def finish(report: dict, paths: str, title: str, *, as_json: bool, quiet: bool, gates: dict[str, float],
           junit: Path | None) -> None:
    """After a job has written its report: the summary as JSON (`--json`) or the metrics table and where the
    files are, then the `--junit` file and the `--fail-under` gates (exit 1 under a bound)."""
    if as_json:
        emit_json(report["summary"])
    elif not quiet:
        print_metrics(report["columns"], title)
        err_console.print(paths, markup=False)
    check_gates(report, gates, junit)
