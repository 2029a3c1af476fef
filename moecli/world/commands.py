"""`moecli world ...`: build or verify the fact-world model, export its edit set, build benchmark models.

Output contract: `build` prints the model directory as the LAST line of stdout (scripts pass it
to `--model`); progress bars go to stderr. Bad input raises `UserError` (the main CLI prints it as
one line and exits 2).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moecli.errors import RunError, UserError

world_app = typer.Typer(
    help="The embedded fact world: build or verify its model, export its edit set, "
    "and build knowledge models of real benchmarks (--from).",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)
_out = Console(soft_wrap=True)

ACCEPT = 0.95  # every template of the fact world must score at least this


@contextmanager
def _training_display(quiet: bool) -> Iterator[tuple]:
    """(progress, on_epoch) callbacks drawing one bar on stderr, or no-ops when quiet."""
    if quiet:
        yield None, None
        return
    if not _err.is_terminal:  # a log file: one line per epoch instead of a live bar

        def log_epoch(stats) -> None:
            acc = f" acc {stats.accuracy:.4f}" if stats.accuracy is not None else ""
            _err.print(
                f"epoch {stats.epoch}: loss {stats.loss:.4f} train acc {stats.train_accuracy:.4f}{acc} "
                f"({stats.n_trained} facts, {stats.seconds:.1f} s)",
                highlight=False,
            )

        yield None, log_epoch
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    )
    state: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if "task" not in state:
            state["task"] = bars.add_task(stage, total=total)
        bars.update(state["task"], completed=done, total=total)

    def on_epoch(stats) -> None:
        if "task" in state:
            acc = f" · acc {stats.accuracy:.3f}" if stats.accuracy is not None else ""
            bars.update(
                state["task"],
                description=f"epoch {stats.epoch} · loss {stats.loss:.3f} · train acc {stats.train_accuracy:.3f}{acc}",
            )

    with bars:
        yield progress, on_epoch


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _accuracy_table(title: str, group_acc: dict[str, float], recorded: dict | None = None) -> Table:
    table = Table(title=title)
    table.add_column("template / field")
    table.add_column("accuracy", justify="right")
    if recorded:
        table.add_column("recorded", justify="right")
    for group, acc in group_acc.items():
        row = [group, f"{acc:.4f}"]
        if recorded:
            rec = recorded.get(group)
            row.append("" if rec is None else f"{rec:.4f}")
        table.add_row(*row)
    return table


@world_app.command("build")
def build(
    from_file: Annotated[
        Path | None,
        typer.Option("--from", help="Build the knowledge model of a benchmark file (ZsRE, CounterFact, JSONL)."),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="With --from: use the first N records (default 1000).")
    ] = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild", help="Retrain even if a built model exists (fact world: rewrites the committed model)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Fact-world generator seed (0 is the committed world).")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Fact world with --rebuild: write the model here instead.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or tables; print only the directory.")
    ] = False,
) -> None:
    """Build (or verify) the fact-world model, or with --from a benchmark's knowledge model.

    The model directory is always the last line of stdout.
    """
    if from_file is not None:
        _build_benchmark(from_file, 1000 if n is None else n, rebuild, quiet)
    else:
        if n is not None:
            raise UserError("--n only applies with --from FILE (the fact world has a fixed set of facts)")
        _build_fact_world(seed, rebuild, out, quiet)


def _build_benchmark(path: Path, n: int, rebuild: bool, quiet: bool) -> None:
    from moecli.world.store import KNOWLEDGE_INFO, benchmark_model_dir

    t0 = time.time()
    with _training_display(quiet) as (progress, on_epoch):
        model_dir = benchmark_model_dir(path, n, progress, rebuild=rebuild, on_epoch=on_epoch)
    info = json.loads((model_dir / KNOWLEDGE_INFO).read_text())
    if not quiet:
        built = info.get("train_seconds") if time.time() - t0 > 5 else None
        how = f"trained in {built:.0f} s" if built is not None else "cached"
        _out.print(
            f"knowledge model of {path} (n={n}, {info.get('n_records')} records, {info.get('n_facts')} facts): {how}"
        )
        _out.print(_accuracy_table("answer-token accuracy on the original facts", info.get("group_accuracy", {})))
        if not info.get("reached_target", True):
            _err.print(
                f"[yellow]warning: training stopped at max_epochs before the target accuracy "
                f"({info['config']['target_accuracy']}) was reached on every field[/yellow]"
            )
    typer.echo(str(model_dir))


def _build_fact_world(seed: int, rebuild: bool, out: Path | None, quiet: bool) -> None:
    from moecli.world import store

    if rebuild or out is not None:
        target = out or (store.ASSET_DIR if seed == store.DEFAULT_SEED else store.fact_world_cache_dir(seed))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror}; pass --out DIR") from None
        with _training_display(quiet) as (progress, on_epoch):
            result = store.build_fact_world(target, seed, store.FACT_WORLD_CONFIG, progress, on_epoch)
        model_dir = target
        if not quiet:
            _out.print(
                f"fact world (seed {seed}): {result.n_facts} facts, {result.n_params:,} parameters, "
                f"{_dir_bytes(model_dir) / 1e6:.2f} MB, {result.epochs} epochs in {result.seconds:.0f} s"
            )
            _out.print(_accuracy_table("answer-token accuracy per template", result.group_accuracy))
        worst = min(result.group_accuracy.values())
    else:
        with _training_display(quiet) as (progress, on_epoch):
            model_dir = store.fact_world_model_dir(seed, progress, on_epoch)
        info = json.loads((model_dir / store.WORLD_INFO).read_text())
        accuracy, group_acc = store.verify_fact_world(model_dir, seed)
        worst = min(group_acc.values())
        if not quiet:
            _out.print(
                f"fact world (seed {seed}) at {model_dir}: {info.get('n_facts')} facts, "
                f"{info.get('n_params', 0):,} parameters, {_dir_bytes(model_dir) / 1e6:.2f} MB; "
                f"accuracy {accuracy:.4f} (recorded {info.get('accuracy')}), worst template {worst:.4f}"
            )
            _out.print(_accuracy_table("answer-token accuracy per template", group_acc, info.get("group_accuracy")))
    if worst < ACCEPT:
        typer.echo(str(model_dir))
        raise RunError(f"the fact-world model scores {worst:.4f} < {ACCEPT} on some template")
    typer.echo(str(model_dir))


@world_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Output JSONL file.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of edit records (deterministic order).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Fact-world generator seed (0 is the committed world).")] = 0,
) -> None:
    """Write the fact world's edit set as moecli JSONL (the first N records, always the same order)."""
    from moecli.data.readers import write_jsonl
    from moecli.world.generator import build_world

    world = build_world(seed)
    if n > world.max_edits():
        raise UserError(f"--n {n}: the fact world has {world.max_edits()} editable facts")
    records = world.edit_records(n)
    write_jsonl(records, out)
    typer.echo(f"wrote {len(records)} edit records of the fact world (seed {seed}) to {out}")
