"""`calibrate` and `plan-order`: the commands that prepare a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moecli.cli.options import (
    DataOpt,
    FormatOpt,
    ModelOptions,
    OutputOptions,
    ReadOptions,
    grouped,
)
from moecli.cli.output import err_console, load_records, note, out_console, progress_reporter, resolve_model_path
from moecli.engine.calibration import SHIPPED
from moecli.errors import RunError, UserError


@grouped(model=ModelOptions, output=OutputOptions)
def calibrate(
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="Train-split records (repeat for several files); never the records you evaluate on. "
                       "Default: the train data moecli ships ("
                       + ", ".join(f"{s.name} {s.start}:{s.end}" for s in SHIPPED) + ").")
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
    *, model: ModelOptions, output: OutputOptions,
) -> None:
    """Train a question encoder for --model on train records: the learned same-question test of the key
    matcher (recipe: query_feature: learned, question_encoder: FILE). Measures it on a held-out fifth of the
    records and sets its threshold there (0.25% of other questions about the same subject let through).
    Without --data it reads the train data moecli ships; without --out it installs the key only (the one an
    editing run calibrates itself on first use of a real model)."""
    from moecli.engine.calibration import calibration_sources
    from moecli.engine.calibration import install as install_key

    picked, groups, labels = calibration_sources(data, list(records or []), same_subject, output.seed, fmt)
    from moecli.model.loading import load_model
    from moecli.routing.question import FALSE_MATCH_RATE
    from moecli.routing.question import calibrate as train

    loaded = load_model(resolve_model_path(model.model, output.silent), device=model.device, dtype=model.dtype,
                        device_map=model.device_map)
    with progress_reporter(not output.silent) as progress:
        encoder = train(loaded, picked, layers=layer, dim=dim, hidden=hidden, seed=output.seed, sources=labels,
                        progress=progress, text=text, groups=groups,
                        false_match_rate=FALSE_MATCH_RATE if false_match_rate is None else false_match_rate)
    if out is not None:
        try:
            encoder.save(out)
        except OSError as exc:
            raise RunError(f"--out {out}: cannot write it: {exc.strerror or exc}") from exc
    if install or out is None:
        install_key(encoder)  # both kinds (text, layers alone) may be installed: find_encoder picks
    _print_key(encoder.info, out, output.as_json)


def _print_key(info: dict, out: Path | None, as_json: bool) -> None:
    """What `calibrate` made: where the key is, and how it did on the held-out records of each file."""
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


@grouped(read=ReadOptions, model=ModelOptions, output=OutputOptions)
def plan_order(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the planned records (moecli JSONL).")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per batch (b).")] = 10,
    embedder: Annotated[
        str, typer.Option("--embedder", help="anchor (the model's input embeddings over the subject) | minilm.")
    ] = "anchor",
    *, read: ReadOptions, model: ModelOptions, output: OutputOptions,
) -> None:
    """Plan a clustering-based editing order (LEMoE): k-means over edit embeddings, batches of
    similar edits, consecutive batches dissimilar. Writes the records in planned order with their
    batch index (read it back with `lifelong --order file`)."""
    from moecli.engine.planning import EMBEDDERS, plan_batches, write_plan

    if embedder not in EMBEDDERS:
        raise UserError(f"--embedder {embedder!r}: choose {', '.join(EMBEDDERS)}")
    found = load_records(data, read.fmt, read.skip_invalid, read.limit)
    loaded = None
    if embedder == "anchor":
        from moecli.model.loading import load_model

        loaded = load_model(resolve_model_path(model.model, output.silent), device=model.device, dtype=model.dtype,
                            device_map=model.device_map)
    plan = plan_batches(found.records, batch_size, loaded=loaded, seed=output.seed, embedder=embedder)
    write_plan(plan, out)
    stats = plan.stats
    if output.as_json:
        sys.stdout.write(json.dumps(stats) + "\n")
        return
    table = Table(title=f"{len(found.records)} records · batches of {batch_size} · {embedder} embeddings")
    table.add_column("order")
    table.add_column("within batches", justify="right")
    table.add_column("between consecutive", justify="right")
    for name in ("planned", "file", "random"):
        if name in stats:
            table.add_row(name, f"{stats[name]['within']:.3f}", f"{stats[name]['between_consecutive']:.3f}")
    out_console.print(table)
    err_console.print(f"planned records: {out}", markup=False)
