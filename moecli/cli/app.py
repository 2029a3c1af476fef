"""The moecli command line: parse, call the engine, print. No editing logic lives here.

Exit codes: 0 success, 1 a run that failed, 2 bad input (one line on stderr, no traceback unless
`--debug`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moecli.errors import RunError, UserError, one_line
from moecli.version import __version__

try:  # typer >= 0.26 vendors its own click; older versions use click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

app = typer.Typer(
    name="moecli",
    help="Edit the knowledge of a frozen language model with a Mixture-of-Experts bypass.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
out_console = Console()


class Interrupted(RunError):
    """Ctrl-C during a run; the message says what is saved and how to finish. Exit code 130 (128 + SIGINT)."""

    exit_code = 130

# ---------------------------------------------------------------- shared options
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="A Hugging Face model directory, a .gguf file (converted once, cached), or a packaged "
                                 "model: smollm2, gemma3-270m. Default: the embedded fact-world model."),
]
DataOpt = Annotated[Path, typer.Option("--data", help="Edit records: ZsRE, CounterFact, hallucination or JSONL.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", help="Force the record format: zsre, counterfact, counterfact-rome, hallucination, jsonl."
    ),
]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="Skip and count invalid records instead of stopping.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N valid records.")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Output directory. Default: a new timestamped directory under runs/.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (or cuda:N).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="'auto' hands a model too big for one GPU to accelerate.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the summary as one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed and inputs give the same result.")]
EvalBatchOpt = Annotated[int, typer.Option("--eval-batch-size", min=1, help="Batch size for evaluation.")]
GenerateOpt = Annotated[
    bool, typer.Option("--generate/--no-generate",
                       help="Also score free generation (greedy, ≤ 32 tokens, to the stop token) and greedy EM.")
]
FailUnderOpt = Annotated[
    str | None, typer.Option("--fail-under", help="CI check: exit 1 when a metric is under its bound, e.g. "
                                                   "rel=0.95,gen=0.7,loc=0.99 (one stderr line per shortfall).")
]
JunitOpt = Annotated[
    Path | None, typer.Option("--junit", help="Write a JUnit XML file, one test case per edit (fails under "
                                               "--fail-under, or when the edit's answer is not fully produced).")
]
SameSubjectOpt = Annotated[int, typer.Option(
    "--same-subject", min=0, help="Add N same_subject locality probes per record: the edited subject put into other "
                                  "records' prompts that ask another relation (the hard locality case; 0: none).")]
ChatOpt = Annotated[
    bool, typer.Option("--chat", help="Wrap every prompt in the model's chat template (instruct models; off: plain "
                                      "completion prompts, as the benchmarks use).")
]


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"moecli {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads for torch (small models on a busy CPU: 1).")
    ] = None,
) -> None:
    """Edit the knowledge of a frozen language model with a Mixture-of-Experts bypass."""
    if debug:
        os.environ["MOECLI_DEBUG"] = "1"
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers
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


# ---------------------------------------------------------------- commands
@app.command()
def evaluate(
    data: DataOpt,
    model: ModelOpt = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="An adapter checkpoint directory to load.")] = None,
    fmt: FormatOpt = None,
    skip_invalid: SkipOpt = False,
    limit: LimitOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    eval_batch_size: EvalBatchOpt = 64,
    generate: GenerateOpt = True,
    chat: ChatOpt = False,
    same_subject: SameSubjectOpt = 0,
    fail_under: FailUnderOpt = None,
    junit: JunitOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Measure a model (optionally with an adapter) on edit records: Known, Rel, Gen, Loc, Port.

    Without --adapter, the model is its own locality baseline (Loc = 1.0) and Known shows how well
    it states the old facts.
    """
    from moecli.engine.reports import check_report_free, parse_fail_under, write_report

    gates = parse_fail_under(fail_under)
    quiet = quiet or as_json
    out_dir = out or default_out_dir("evaluate")
    check_out_dir(out_dir)
    check_report_free(out_dir)
    if adapter is not None:
        from moecli.engine.checkpoint import resolve_adapter_dir

        adapter = resolve_adapter_dir(adapter)
    t0 = time.perf_counter()
    read = _load_records(data, fmt, skip_invalid, limit, same_subject, what="valid records to evaluate")
    # Imported only now (torch + transformers take seconds): a bad --data file is reported at once.
    from moecli.engine.evaluation import evaluate_records, unedited_evaluation
    from moecli.engine.run import check_lengths
    from moecli.model.batching import chat_records
    from moecli.model.loading import fingerprint, load_model

    loaded = load_model(resolve_model_path(model, quiet), device=device, dtype=dtype, device_map=device_map)
    records = chat_records(read.records, loaded.tokenizer) if chat else read.records
    check_lengths(loaded, records, str(data))
    kwargs = dict(batch_size=eval_batch_size, generation=generate, perplexity=read.format == "hallucination")
    with progress_reporter(not quiet) as progress:
        base_fp = fingerprint(loaded.model)
        if adapter is None:
            result = unedited_evaluation(loaded.model, loaded.tokenizer, records, base_fp, progress=progress,
                                         **kwargs).before
            columns = {"model": result.summary}
        else:
            from moecli.engine.run import checked_checkpoint, load_edited

            ckpt = checked_checkpoint(adapter, base_fp)  # a wrong adapter: at once
            # The locality baseline is the unedited model's output, taken before the adapter goes in.
            unedited = unedited_evaluation(loaded.model, loaded.tokenizer, records, base_fp, progress=progress,
                                           before=False, **kwargs)
            records, baseline = unedited.records, unedited.baseline
            method = load_edited(loaded, adapter, checkpoint=ckpt)
            result = evaluate_records(loaded.model, loaded.tokenizer, records, baseline, progress=progress,
                                      **kwargs)
            from moecli.engine.run import routing_diagnosis

            routing = routing_diagnosis(method, records, result.per_edit, eval_batch_size, ckpt.ledger)
            if routing is not None:
                result.summary["routing"] = routing
            columns = {"edited": result.summary}
    report = {
        "command": "evaluate", "moecli_version": __version__, "model": str(loaded.path),
        "data": str(data), "format": read.format, "adapter": str(adapter) if adapter else None,
        "protocol": "evaluation of the unedited model" if adapter is None else "evaluation of an adapter", "chat": chat,
        "n_edits": len(read.records), "skipped": read.skipped, "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": {"total": time.perf_counter() - t0},
        "columns": columns, "summary": result.summary, "per_edit": result.per_edit,
    }
    json_path, md_path = write_report(out_dir, report)
    if as_json:
        emit_json(result.summary)
    elif not quiet:
        print_metrics(columns, f"{len(read.records)} records · {loaded.path.name}")
        err_console.print(f"reports: {json_path}  {md_path}", markup=False)
    check_gates(report, gates, junit)


RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", help="YAML recipe: a file or a shipped name (lemoe, …); flags override it.")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one recipe option: --set KEY=VALUE (repeatable).")
]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="Decoder layer to edit (default: the method's).")]
ExpertFormOpt = Annotated[str | None, typer.Option("--expert-form", help="dense | lowrank")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate of the edit training.")]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Maximum training steps per batch.")]


def _load_records(data: Path | None, fmt: str | None, skip_invalid: bool, limit: int | None, same_subject: int = 0,
                  what: str = "valid records"):
    """Read --data (one stderr line for what --skip-invalid left out), with `same_subject` probes added and
    the neighbourhood probes that ask another record's edit dropped (`locality.with_probes`)."""
    from moecli.data.records import read_records

    if data is None:
        raise UserError("--data FILE is required (or --prompt/--target for one edit)")
    read = read_records(data, fmt, skip_invalid=skip_invalid, limit=limit)
    if not read.records:
        raise UserError(f"{data}: no {what}{_skipped_note(read)}")
    if read.skipped:
        err_console.print(_skipped_line(read), markup=False, highlight=False, soft_wrap=True)
    from moecli.data.probes import with_probes

    read.records, dropped = with_probes(read.records, data, same_subject, fmt)
    if dropped:
        err_console.print(f"{data}: {dropped} neighborhood probes ask another record's edited fact; not scored "
                          "as locality", markup=False, highlight=False, soft_wrap=True)
    return read


def _skipped_note(read) -> str:
    return f" ({read.skipped} skipped, the first: {read.problems[0]})" if read.problems else ""


def _skipped_line(read) -> str:
    """One stderr line for --skip-invalid: how many records were left out, and the first reason."""
    return f"moecli: skipped {read.skipped} invalid records (the first: {read.problems[0]})"


@dataclass
class EditingOptions:
    """The options `edit`, `batch-edit` and `lifelong` share, declared once (`EDITING_OPTIONS`)."""

    fmt: str | None = None
    skip_invalid: bool = False
    limit: int | None = None
    method: str | None = None
    recipe: Path | None = None
    sets: list[str] | None = None
    layer: int | None = None
    expert_form: str | None = None
    lr: float | None = None
    max_steps: int | None = None
    model: str | None = None
    adapter: Path | None = None
    out: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    eval_batch_size: int = 64
    generate: bool = True
    chat: bool = False
    same_subject: int = 0
    fail_under: str | None = None
    junit: Path | None = None
    as_json: bool = False
    quiet: bool = False
    seed: int = 0


EDITING_OPTIONS: dict[str, object] = {
    "fmt": FormatOpt, "skip_invalid": SkipOpt, "limit": LimitOpt,
    "method": Annotated[str | None, typer.Option(
        "--method", help="memoe, lemoe, scen, ft, lora, grace, wise or locft (default: the recipe's, else memoe; "
                         "lifelong: lemoe).")],
    "recipe": RecipeOpt, "sets": SetOpt, "layer": LayerOpt, "expert_form": ExpertFormOpt, "lr": LrOpt,
    "max_steps": StepsOpt, "model": ModelOpt,
    "adapter": Annotated[Path | None, typer.Option("--adapter", help="Continue an existing adapter.")],
    "out": OutOpt, "device": DeviceOpt, "dtype": DtypeOpt, "device_map": DeviceMapOpt,
    "eval_batch_size": EvalBatchOpt, "generate": GenerateOpt, "chat": ChatOpt, "same_subject": SameSubjectOpt,
    "fail_under": FailUnderOpt,
    "junit": JunitOpt, "as_json": JsonOpt, "quiet": QuietOpt, "seed": SeedOpt,
}


def editing_command(fn):
    """Give an editing command every option of `EditingOptions` (its own options come first); the
    command receives them as one `opts` argument, so a new shared option is added in one place."""
    import functools
    import inspect
    import typing

    defaults = EditingOptions()
    hints = typing.get_type_hints(fn, include_extras=True)  # this module's annotations are strings
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(fn).parameters.values() if p.name != "opts"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                default=getattr(defaults, name)) for name, kind in EDITING_OPTIONS.items()]

    @functools.wraps(fn)
    def command(**kwargs):
        opts = EditingOptions(**{name: kwargs.pop(name) for name in EDITING_OPTIONS})
        return fn(**kwargs, opts=opts)

    command.__signature__ = inspect.Signature(own + shared)
    command.__annotations__ = {**{p.name: p.annotation for p in own}, **EDITING_OPTIONS}
    return command


def _run_editing(command: str, records, read_format: str | None, data: Path | None, batch_size: int,
                 opts: EditingOptions, protocol: str = "batch", extra: dict | None = None) -> None:
    """Shared body of edit / batch-edit / lifelong: build the spec, run it, print and write reports."""
    from moecli.engine.recipes import build_config, read_recipe
    from moecli.engine.reports import check_report_free, parse_fail_under
    from moecli.engine.run import RunSpec

    gates = parse_fail_under(opts.fail_under)  # a malformed check is refused before minutes of editing
    quiet = opts.quiet or opts.as_json
    out_dir = opts.out or default_out_dir(command)
    check_out_dir(out_dir)
    overrides = {"layer": opts.layer, "expert_form": opts.expert_form, "lr": opts.lr, "max_steps": opts.max_steps}
    if opts.adapter is not None:
        method, config, recipe_values = _continued_config(opts, overrides)
    else:
        recipe_values = read_recipe(opts.recipe) if opts.recipe else {}
        method = opts.method or recipe_values.get("method") or ("lemoe" if command == "lifelong" else "memoe")
        config = build_config(method, recipe_values, overrides, opts.sets, source=str(opts.recipe or "options"))
    spec = RunSpec(
        command=command, method=method, config=config, records=records, batch_size=batch_size,
        out_dir=out_dir, model_path=resolve_model_path(opts.model, quiet),
        device=opts.device, dtype=opts.dtype, device_map=opts.device_map, seed=opts.seed,
        data=str(data) if data else None, data_format=read_format, recipe=recipe_values, adapter=opts.adapter,
        eval_batch_size=opts.eval_batch_size, generation=opts.generate, perplexity=read_format == "hallucination",
        protocol=protocol, chat=opts.chat, **(extra or {}),
    )
    from moecli.engine.checkpoint import busy_message, lock_holder

    holder = lock_holder(spec.out_dir)
    if holder is not None:  # a run is writing there now: say so, not "already holds an adapter"
        raise UserError(busy_message(spec.out_dir, holder))
    if (spec.out_dir / "adapter").exists() and opts.adapter is None:
        raise UserError(f"--out {spec.out_dir} already holds an adapter; finish it with `moecli lifelong --resume "
                        f"{spec.out_dir}`, continue it with --adapter, or pick another --out")
    check_report_free(spec.out_dir)
    _execute(spec, opts.as_json, quiet, gates=gates, junit=opts.junit)


def _continued_config(opts: EditingOptions, overrides: dict):
    """`--adapter`: the method and options the adapter was made with (its tensors are that method's, in that
    shape). Another method, or an option that would change them, is refused rather than ignored."""
    from moecli.engine.checkpoint import load_checkpoint
    from moecli.engine.run import adapter_method_config

    ckpt = load_checkpoint(opts.adapter)
    name, config = adapter_method_config(ckpt, opts.adapter)
    asked = opts.method or (read_recipe_method(opts.recipe) if opts.recipe else None)
    if asked is not None and asked != name:
        raise UserError(f"--method {asked}: --adapter {opts.adapter} is a {name} adapter; continue it with "
                        f"--method {name} (or leave --method out), or start a new adapter")
    given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
    given += ["--recipe"] * bool(opts.recipe) + [f"--set {s}" for s in opts.sets or []]
    if given:
        raise UserError(f"--adapter {opts.adapter} is continued with the options it was made with; drop "
                        f"{', '.join(given)} (they are in its adapter_config.json)")
    return name, config, dict(ckpt.manifest.get("recipe") or {})


def read_recipe_method(recipe: Path) -> str | None:
    from moecli.engine.recipes import read_recipe

    return read_recipe(recipe).get("method")


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


def _execute(spec, as_json: bool, quiet: bool, resume: bool = False, gates: dict | None = None,
             junit: Path | None = None) -> None:
    """Run a spec (fresh or resumed), write report.json/report.md (+ retention.png), print the table."""
    from moecli.engine.reports import plot_retention, write_report
    from moecli.engine.run import run_edits

    try:
        with progress_reporter(not quiet) as progress:
            report = run_edits(spec, progress, resume=resume)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(spec.out_dir)) from None
    try:
        json_path, md_path = write_report(spec.out_dir, report)
    except OSError as exc:
        raise RunError(f"cannot write the report in {spec.out_dir}: {exc.strerror or exc}; the adapter is complete; "
                       f"once there is room, `moecli lifelong --resume {spec.out_dir}` writes the report") from exc
    if report.get("retention"):
        plot_retention(report["retention"], spec.out_dir / "retention.png", f"{spec.method} retention")
    if as_json:
        emit_json(report["summary"])
    elif not quiet:
        print_metrics(report["columns"], f"{spec.method} · {len(spec.records)} edits · batch {spec.batch_size} · "
                                         f"{Path(spec.model_path).name}")
        err_console.print(f"adapter: {report['adapter']}\nreports: {json_path}  {md_path}", markup=False)
    check_gates(report, gates or {}, junit)


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


def _interrupted_message(out_dir: Path) -> str:
    """What Ctrl-C left in `out_dir` and the command that finishes the run."""
    from moecli.engine.run import RUN_FILE, saved_so_far

    if not (out_dir / RUN_FILE).is_file():
        return "interrupted before anything was saved; run the command again"
    return f"interrupted; {saved_so_far(out_dir)}; finish with: moecli lifelong --resume {out_dir}"


@app.command()
@editing_command
def edit(
    prompt: Annotated[str | None, typer.Option("--prompt", help="The question or sentence prefix to edit.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="The new answer.")] = None,
    subject: Annotated[
        str | None, typer.Option("--subject", help="The entity the edit is about (a substring of --prompt).")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Edit records instead of --prompt/--target.")] = None,
    *, opts: EditingOptions,
) -> None:
    """Apply one edit (--prompt/--target) or the records of --data in one batch, then evaluate."""
    from moecli.data.probes import default_locality
    from moecli.data.records import EditRecord, validate_record

    if prompt is not None or target is not None:
        if data is not None:
            raise UserError("give either --prompt/--target or --data, not both")
        if not prompt or target is None:
            raise UserError("--prompt and --target go together")
        rec = EditRecord(prompt=prompt, target=target.strip(), subject=subject, locality=default_locality(subject))
        problem = validate_record(rec)
        if problem:
            raise UserError(f"--prompt/--target: {problem}")
        records, read_format = [rec], "flags"
    else:
        read = _load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
        records, read_format = read.records, read.format
    _run_editing("edit", records, read_format, data, len(records), opts)


@app.command("batch-edit")
@editing_command
def batch_edit(
    data: DataOpt,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per batch.")] = 100,
    *, opts: EditingOptions,
) -> None:
    """Apply all records in batches of --batch-size, each batch continuing the same adapter (MEMoE's
    sequential batch editing); evaluate every edit before and after."""
    read = _load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
    _run_editing("batch-edit", read.records, read.format, data, batch_size, opts,
                 protocol="batch" if batch_size >= len(read.records) else "sequential batch")


@app.command()
@editing_command
def lifelong(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option("--data", help="The stream of edit records.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per step (b).")] = 10,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Number of steps T (default: all).")] = None,
    order: Annotated[str, typer.Option("--order", help="file | random | planned (clustering-based).")] = "file",
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=0, help="Every K steps, evaluate a fixed sample of earlier edits.")
    ] = 0,
    eval_sample: Annotated[int, typer.Option("--eval-sample", min=1, help="Size of that sample.")] = 100,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Finish an interrupted run in this directory.")
    ] = None,
    *, opts: EditingOptions,
) -> None:
    """Feed a stream of edit batches (LEMoE: a new expert per batch, earlier ones frozen), then evaluate
    every edit of the stream on the final model (the WISE/LEMoE lifelong protocol)."""
    if resume is not None:
        allowed = ("resume", "quiet", "as_json", "fail_under", "junit")
        given = [p.opts[0] for p in ctx.command.params if p.name not in allowed
                 and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
        if given:
            raise UserError(f"--resume {resume} finishes the run with the options it was started with; "
                            f"drop {', '.join(given)} (they are in {resume / 'run.json'})")
        from moecli.engine.reports import parse_fail_under
        from moecli.engine.run import load_run_spec

        gates = parse_fail_under(opts.fail_under)
        spec = load_run_spec(resume)
        _execute(spec, opts.as_json, opts.quiet or opts.as_json, resume=True, gates=gates, junit=opts.junit)
        return
    if order not in ("file", "random", "planned"):
        raise UserError(f"--order {order!r}: choose file, random or planned")
    read = _load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
    records = read.records[: steps * batch_size] if steps else read.records
    if order == "random":
        import random

        records = list(records)
        random.Random(opts.seed).shuffle(records)
    _run_editing("lifelong", records, read.format, data, batch_size, opts, protocol="lifelong",
                 extra={"eval_every": eval_every, "eval_sample": eval_sample, "order": order})


@app.command()
def calibrate(
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="Train-split records (repeat for several files); never the records you evaluate on. "
                       "Default: the train data moecli ships (counterfact_train 0:2000, zsre_train_1k 0:1000).")
                    ] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the question encoder (.safetensors); default: only install it.")] = None,
    records: Annotated[list[str] | None, typer.Option(
        "--records", help="START:END of each --data file, in the same order (default: all).")] = None,
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", help="Decoder layer(s) to encode, repeat for several (default: 0.4, 0.55 and 0.7 of depth).")
                     ] = None,
    hidden: Annotated[int, typer.Option("--hidden", min=0, help="Hidden width of the encoder (0: linear).")] = 0,
    install: Annotated[bool, typer.Option(
        "--install",
        help="Also put it in $MOECLI_CACHE/questions: the default key for this model (query_feature auto); "
             "implied without --out.")] = False,
    dim: Annotated[int, typer.Option("--dim", min=8, help="Width of the question codes.")] = 128,
    same_subject: Annotated[int, typer.Option("--same-subject", min=1, help="Other-question probes per record.")] = 3,
    text: Annotated[bool, typer.Option(
        "--text/--no-text", help="Also read the MiniLM embedding of the prompt with its entity blanked "
                                 "(the embed extra); --no-text: the model's layers alone.")] = True,
    false_match_rate: Annotated[float | None, typer.Option(
        "--false-match-rate", min=0.0001, max=0.5,
        help="Share of held-out other questions about the same subject the threshold lets through "
             "(default: moecli.routing.question.FALSE_MATCH_RATE).")] = None,
    fmt: FormatOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Train a question encoder for --model on train records: the learned same-question test of the key
    matcher (recipe: query_feature: learned, question_encoder: FILE). Measures it on a held-out fifth of the
    records and sets its threshold there (0.25% of other questions about the same subject let through).
    Without --data it reads the train data moecli ships; without --out it installs the key only (the one an
    editing run calibrates itself on first use of a real model)."""
    from moecli.engine.calibration import SHIPPED, calibration_records
    from moecli.engine.calibration import install as install_key

    spans = list(records or [])
    if data:
        sources = [(path, spans[i] if spans else None) for i, path in enumerate(data)]
        if spans and len(spans) != len(data):
            raise UserError(f"--records: give one START:END per --data file ({len(data)} files, {len(spans)} ranges)")
    else:  # the shipped train files, their default ranges unless --records gives others
        if spans and len(spans) != len(SHIPPED):
            raise UserError(f"--records: give one START:END per shipped file ({', '.join(s.name for s in SHIPPED)})")
        sources = [(s.path, spans[i] if spans else f"{s.start}:{s.end}") for i, s in enumerate(SHIPPED)]
    picked, groups, labels = [], [], []
    for path, span in sources:
        start, end = 0, None
        if span is not None:
            try:
                start, end = (int(v) for v in span.split(":"))
            except ValueError:
                raise UserError(f"--records {span!r}: expected START:END, e.g. 0:1000") from None
        part = calibration_records(path, start, end, same_subject, seed, fmt)
        name = str(path) if data else f"shipped:{Path(path).name.split('.')[0]}"
        label = f"{name}[{span}]" if span else name
        picked += part
        groups += [label] * len(part)
        labels.append(label)
    from moecli.model.loading import load_model
    from moecli.routing.question import FALSE_MATCH_RATE
    from moecli.routing.question import calibrate as train

    loaded = load_model(resolve_model_path(model, quiet or as_json), device=device, dtype=dtype)
    with progress_reporter(not (quiet or as_json)) as progress:
        encoder = train(loaded, picked, layers=layer, dim=dim, hidden=hidden, seed=seed, sources=labels,
                        progress=progress, text=text, groups=groups,
                        false_match_rate=FALSE_MATCH_RATE if false_match_rate is None else false_match_rate)
    if out is not None:
        try:
            encoder.save(out)
        except OSError as exc:
            raise RunError(f"--out {out}: cannot write it: {exc.strerror or exc}") from exc
    if install or out is None:
        install_key(encoder)  # both kinds (text, layers alone) may be installed: find_encoder picks
    info = encoder.info
    if "warning" in info:
        note(f"moecli: warning: {info['warning']}")
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    where = " ".join(str(p) for p in (out, info.get("installed")) if p)
    lines = [f"question encoder: {where} (layers {info['layers']}, {info['records']} records; held out: AUC "
             f"{info.get('auc', float('nan')):.3f}, rephrasings reached {info.get('recall_at_threshold', 0):.3f} "
             f"at threshold {info['threshold']:.3f})"]
    lines += [f"  {name}: rephrasings reached {m['recall_at_threshold']:.3f}, false matches "
              f"{m['false_match_rate']:.4f}" for name, m in info.get("per_source", {}).items()]
    err_console.print("\n".join(lines), markup=False)


@app.command("plan-order")
def plan_order(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the planned records (moecli JSONL).")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per batch (b).")] = 10,
    embedder: Annotated[
        str, typer.Option("--embedder", help="anchor (the model's input embeddings over the subject) | minilm.")
    ] = "anchor",
    fmt: FormatOpt = None,
    skip_invalid: SkipOpt = False,
    limit: LimitOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Plan a clustering-based editing order (LEMoE): k-means over edit embeddings, batches of
    similar edits, consecutive batches dissimilar. Writes the records in planned order with their
    batch index (read it back with `lifelong --order file`)."""
    from moecli.engine.planning import EMBEDDERS, plan_batches, write_plan

    if embedder not in EMBEDDERS:
        raise UserError(f"--embedder {embedder!r}: choose {', '.join(EMBEDDERS)}")
    read = _load_records(data, fmt, skip_invalid, limit)
    loaded = None
    if embedder == "anchor":
        from moecli.model.loading import load_model

        loaded = load_model(resolve_model_path(model, quiet or as_json), device=device, dtype=dtype)
    plan = plan_batches(read.records, batch_size, loaded=loaded, seed=seed, embedder=embedder)
    write_plan(plan, out)
    stats = plan.stats
    if as_json:
        sys.stdout.write(json.dumps(stats) + "\n")
        return
    table = Table(title=f"{len(read.records)} records · batches of {batch_size} · {embedder} embeddings")
    table.add_column("order")
    table.add_column("within batches", justify="right")
    table.add_column("between consecutive", justify="right")
    for name in ("planned", "file", "random"):
        if name in stats:
            table.add_row(name, f"{stats[name]['within']:.3f}", f"{stats[name]['between_consecutive']:.3f}")
    out_console.print(table)
    err_console.print(f"planned records: {out}", markup=False)


@app.command()
def ask(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts to complete (or --file).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A text file of prompts, one per line.")] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="An adapter: show the base and the edited answers side by side.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="The model (default: the adapter's base model, else the fact world; "
                                                  "a directory, a .gguf file, smollm2, gemma3-270m).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate per prompt.")] = 16,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (temperature 1), not greedy decoding.")] = False,
    chat: ChatOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Ask the model: generate an answer to each prompt; with --adapter, the base model's and the edited
    model's answers side by side, and which edit each prompt was routed to."""
    from moecli.engine.run import ask_model

    texts = list(prompts or [])
    if file is not None:
        try:
            texts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--file {file}: cannot read it ({exc})") from exc
    if not texts:
        raise UserError("give one or more prompts, or --file")
    if adapter is not None:
        from moecli.engine.checkpoint import resolve_adapter_dir

        adapter = resolve_adapter_dir(adapter)
    if model is None and adapter is not None:
        from moecli.engine.checkpoint import load_checkpoint

        model = load_checkpoint(adapter).manifest.get("base_model", {}).get("path")
    rows = ask_model(resolve_model_path(model, as_json), texts, adapter, max_new_tokens=max_new_tokens, sample=sample,
                     chat=chat, device=device, dtype=dtype, seed=seed)
    if as_json:
        sys.stdout.write(json.dumps(rows, ensure_ascii=False) + "\n")
        return
    from rich.markup import escape

    table = Table(show_lines=True)
    table.add_column("prompt")
    table.add_column("base model" if adapter else "answer")
    if adapter:
        table.add_column("edited model")
        table.add_column("routed to")
    for row in rows:
        cells = [row["prompt"], row["base"]]
        if adapter:
            edit = row["route"]
            cells += [row["edited"], f"{edit['id']}: {edit['prompt']} → {edit['target']}" if edit else "— (no edit)"]
        table.add_row(*(escape(c) for c in cells))
    out_console.print(table)


@app.command()
def show(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (or the run directory holding it).")],
    grep: Annotated[str | None, typer.Option("--grep", help="Only edits whose id, prompt, target or subject "
                                                             "contains TEXT (any case).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What an adapter holds: method, base model, when it was saved, the stream position, and its edits."""
    from moecli.engine.checkpoint import load_checkpoint, resolve_adapter_dir

    path = resolve_adapter_dir(adapter, "show")  # errors name the command: its adapter is an argument
    ckpt = load_checkpoint(path, "show")
    m = ckpt.manifest
    edits = ckpt.ledger
    if grep:
        needle = grep.lower()
        edits = [e for e in edits if any(needle in str(e.get(k) or "").lower()
                                         for k in ("id", "prompt", "target", "subject"))]
    info = {"adapter": str(path), "method": ckpt.config.get("method"),
            "base_model": m.get("base_model", {}).get("path"), "saved": m.get("saved"), "command": m.get("command"),
            "stream": m.get("stream", {}), "history": m.get("history", []),
            "n_edits": len(ckpt.ledger), "n_reverted": sum(1 for e in ckpt.ledger if e.get("reverted")),
            "edits": edits}
    if as_json:
        stream = {k: v for k, v in info["stream"].items() if k != "record_ids"}
        sys.stdout.write(json.dumps({**info, "stream": stream}, ensure_ascii=False) + "\n")
        return
    from rich.markup import escape

    stream = info["stream"]
    out_console.print(escape(f"{info['method']} adapter {path}\nbase model: {info['base_model']}\nsaved: "
                             f"{info['saved']} by `moecli {info['command']}`; stream: batch {stream.get('position')}"
                             f" of {stream.get('n_batches')}; {info['n_edits']} edits ({info['n_reverted']} "
                             "reverted)"), highlight=False)
    table = Table()
    table.add_column("id", no_wrap=True)  # ids are what `revert --id` takes: never cut
    for col in ("prompt", "target", "batch", "expert", "reverted"):
        table.add_column(col)
    for e in edits:
        table.add_row(*(escape(str(e.get(k) if e.get(k) is not None else "—"))
                        for k in ("id", "prompt", "target", "batch", "expert", "reverted")))
    out_console.print(table)


@app.command()
def revert(
    adapter: Annotated[Path, typer.Argument(help="The adapter (or run directory) to take edits out of.")],
    ids: Annotated[list[str] | None, typer.Option("--id", help="An edit's id (repeatable; see `moecli show`).")] = None,
    batches: Annotated[list[int] | None, typer.Option("--batch", help="Every edit of a batch (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the result as a new run directory; the "
                                                            "adapter given stays as it is.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Take edits back without retraining the others: their prompts get the base model's answers again,
    every other edit keeps its metrics (memoe, lemoe, scen, grace). Atomic, recorded in the ledger."""
    from moecli.engine.run import revert_edits

    if not ids and not batches:
        raise UserError("name the edits to take back with --id ID or --batch N")
    if out is not None:
        check_out_dir(out)
    result = revert_edits(adapter, list(ids or []), list(batches or []), out, option="revert")
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    err_console.print(f"reverted {len(result['reverted'])} edit(s) ({', '.join(result['reverted'])}); "
                      f"{result['remaining']} remain; adapter: {result['adapter']}", markup=False, highlight=False,
                      soft_wrap=True)


def _mount_world() -> None:
    try:
        from moecli.world.commands import world_app
    except ImportError:  # pragma: no cover - only while the world package is being built
        return
    app.add_typer(world_app, name="world")


_mount_world()


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn bad input into one line on stderr and exit 2, no traceback."""
    debug = os.environ.get("MOECLI_DEBUG") == "1" or "--debug" in (argv if argv is not None else sys.argv)
    try:
        rc = app(args=argv, prog_name="moecli", standalone_mode=False)
        if isinstance(rc, int) and rc:
            if rc == 130:  # typer turns a Ctrl-C outside a run into a silent exit code 130
                err_console.print("moecli: interrupted", markup=False)
            sys.exit(rc)
    except Interrupted as exc:
        if debug:
            raise
        err_console.print(f"moecli: {one_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (UserError, RunError) as exc:
        if debug:
            raise
        err_console.print(f"moecli: error: {one_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, getattr(_click_exc, "Exit", typer.Exit)) as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, getattr(_click_exc, "Abort", typer.Abort)):
        err_console.print("moecli: interrupted", markup=False)
        sys.exit(130)
    except _click_exc.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            sys.stdout.write(exc.ctx.get_help() + "\n")
        sys.exit(0)
    except _click_exc.UsageError as exc:
        if debug:
            raise
        name = exc.ctx.command_path if exc.ctx else "moecli"
        err_console.print(f"moecli: error: {exc.format_message()} (see: {name} --help)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except _click_exc.ClickException as exc:
        if debug:
            raise
        err_console.print(f"moecli: error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("moecli: interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # a failed run: one line, the traceback only with --debug
        if debug:
            raise
        err_console.print(f"moecli: error: {type(exc).__name__}: {one_line(exc)} "
                          "(rerun with --debug for the traceback)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)



if __name__ == "__main__":  # pragma: no cover
    main()
