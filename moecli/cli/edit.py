"""`edit`, `batch-edit` and `lifelong`: one path (`_run_editing`) from options to `engine.run.run_edits`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moecli.cli.options import DataOpt, EditingOptions, chosen_method, editing_command
from moecli.cli.output import (
    Interrupted,
    check_out_dir,
    default_out_dir,
    finish,
    load_records,
    progress_reporter,
    resolve_model_path,
)
from moecli.errors import RunError, UserError


def _run_editing(command: str, records, read_format: str | None, data: Path | None, batch_size: int,
                 opts: EditingOptions, protocol: str = "batch", extra: dict | None = None) -> None:
    """Shared body of edit / batch-edit / lifelong: build the spec, run it, print and write reports."""
    from moecli.engine.recipes import build_config, read_recipe
    from moecli.engine.reports import check_report_free, parse_fail_under
    from moecli.engine.run import RunSpec

    gates = parse_fail_under(opts.fail_under)  # a malformed check is refused before minutes of editing
    quiet = opts.silent
    out_dir = opts.out or default_out_dir(command)
    check_out_dir(out_dir)
    overrides = {"layer": opts.layer, "expert_form": opts.expert_form, "lr": opts.lr, "max_steps": opts.max_steps}
    if opts.adapter is not None:
        method, config, recipe_values = _continued_config(opts, overrides)
    else:
        recipe_values = read_recipe(opts.recipe) if opts.recipe else {}
        method = chosen_method(command, opts.method, recipe_values)
        config = build_config(method, recipe_values, overrides, opts.sets, source=str(opts.recipe or "options"))
    spec = RunSpec(
        command=command, method=method, config=config, records=records, batch_size=batch_size,
        out_dir=out_dir, model_path=resolve_model_path(opts.model, quiet),
        device=opts.device, dtype=opts.dtype, device_map=opts.device_map, seed=opts.seed,
        data=str(data) if data else None, data_format=read_format, recipe=recipe_values, adapter=opts.adapter,
        eval_batch_size=opts.eval_batch_size, generation=opts.generate, perplexity=read_format == "hallucination",
        protocol=protocol, chat=opts.chat, **(extra or {}),
    )
    from moecli.engine.lock import busy_message, lock_holder

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
    from moecli.engine.adapters import adapter_method_config
    from moecli.engine.checkpoint import load_checkpoint

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
    finish(report, f"adapter: {report['adapter']}\nreports: {json_path}  {md_path}",
           f"{spec.method} · {len(spec.records)} edits · batch {spec.batch_size} · {Path(spec.model_path).name}",
           as_json=as_json, quiet=quiet, gates=gates or {}, junit=junit)


def _interrupted_message(out_dir: Path) -> str:
    """What Ctrl-C left in `out_dir` and the command that finishes the run."""
    from moecli.engine.run import RUN_FILE, saved_so_far

    if not (out_dir / RUN_FILE).is_file():
        return "interrupted before anything was saved; run the command again"
    return f"interrupted; {saved_so_far(out_dir)}; finish with: moecli lifelong --resume {out_dir}"


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
        read = load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
        records, read_format = read.records, read.format
    _run_editing("edit", records, read_format, data, len(records), opts)


@editing_command
def batch_edit(
    data: DataOpt,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per batch.")] = 100,
    *, opts: EditingOptions,
) -> None:
    """Apply all records in batches of --batch-size, each batch continuing the same adapter (MEMoE's
    sequential batch editing); evaluate every edit before and after."""
    read = load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
    _run_editing("batch-edit", read.records, read.format, data, batch_size, opts,
                 protocol="batch" if batch_size >= len(read.records) else "sequential batch")


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
        _execute(spec, opts.as_json, opts.silent, resume=True, gates=gates, junit=opts.junit)
        return
    if order not in ("file", "random", "planned"):
        raise UserError(f"--order {order!r}: choose file, random or planned")
    read = load_records(data, opts.fmt, opts.skip_invalid, opts.limit, opts.same_subject)
    records = read.records[: steps * batch_size] if steps else read.records
    if order == "random":
        import random

        records = list(records)
        random.Random(opts.seed).shuffle(records)
    _run_editing("lifelong", records, read.format, data, batch_size, opts, protocol="lifelong",
                 extra={"eval_every": eval_every, "eval_sample": eval_sample, "order": order})
