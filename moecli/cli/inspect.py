"""`evaluate`, `ask`, `show` and `revert`: commands that read an adapter (or the bare model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moecli.cli.options import (
    ChatOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOptions,
    JsonOpt,
    ModelOptions,
    OutOpt,
    OutputOptions,
    ReadOptions,
    SeedOpt,
    grouped,
)
from moecli.cli.output import (
    check_out_dir,
    default_out_dir,
    err_console,
    finish,
    load_records,
    out_console,
    progress_reporter,
    resolve_model_path,
)
from moecli.errors import UserError


@grouped(read=ReadOptions, model=ModelOptions, evaluation=EvalOptions, output=OutputOptions)
def evaluate(
    data: DataOpt,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="An adapter checkpoint directory to load.")] = None,
    out: OutOpt = None,
    *, read: ReadOptions, model: ModelOptions, evaluation: EvalOptions, output: OutputOptions,
) -> None:
    """Measure a model (optionally with an adapter) on edit records: Known, Rel, Gen, Loc, Port.

    Without --adapter, the model is its own locality baseline (Loc = 1.0) and Known shows how well
    it states the old facts.
    """
    from moecli.engine.reports import check_report_free, parse_fail_under, write_report

    gates = parse_fail_under(evaluation.fail_under)
    out_dir = out or default_out_dir("evaluate")
    check_out_dir(out_dir)
    check_report_free(out_dir)
    if adapter is not None:
        from moecli.engine.checkpoint import resolve_adapter_dir

        adapter = resolve_adapter_dir(adapter)
    found = load_records(data, read.fmt, read.skip_invalid, read.limit, evaluation.same_subject,
                         what="valid records to evaluate")
    # Imported only now (torch + transformers take seconds): a bad --data file is reported at once.
    from moecli.engine.evaluate import evaluate_model

    with progress_reporter(not output.silent) as progress:
        report = evaluate_model(resolve_model_path(model.model, output.silent), found.records, data=str(data),
                                data_format=found.format, adapter=adapter, device=model.device, dtype=model.dtype,
                                device_map=model.device_map, eval_batch_size=evaluation.eval_batch_size,
                                generation=evaluation.generate, chat=evaluation.chat, skipped=found.skipped,
                                seed=output.seed, progress=progress)
    json_path, md_path = write_report(out_dir, report)
    finish(report, f"reports: {json_path}  {md_path}", f"{len(found.records)} records · {Path(report['model']).name}",
           as_json=output.as_json, quiet=output.quiet, gates=gates, junit=evaluation.junit)


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
    from moecli.engine.adapters import ask_model

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
    from moecli.engine.adapters import revert_edits

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
