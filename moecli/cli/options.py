"""The options shared by several commands, each declared once (help text, type, flag name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

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


def chosen_method(command: str, method: str | None, recipe: dict) -> str:
    """The method a run edits with: --method, else the recipe's, else the command's default (lifelong: LEMoE,
    the others: MEMoE)."""
    return method or recipe.get("method") or ("lemoe" if command == "lifelong" else "memoe")


def show_set_help(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """`--set help` (or `--set ?`): print the chosen method's options and exit 0.

    The callback of --method, --recipe and --set, all three eager: they are read before every other option, so
    `batch-edit --set help` needs no --data; the last of them to be read decides, since the method is --method's,
    else the recipe's, else the command's default (as `edit._run_editing` picks it)."""
    seen = {**ctx.params, param.name: value}
    if ctx.resilient_parsing or not all(name in seen for name in ("method", "recipe", "sets")):
        return value
    from moecli.engine.recipes import SET_HELP, describe_options, read_recipe

    if not any(item.strip() in SET_HELP for item in seen["sets"] or []):
        return value
    recipe = read_recipe(seen["recipe"]) if seen["recipe"] else {}
    method = chosen_method(ctx.info_name, seen["method"], recipe)
    typer.echo(describe_options(method), nl=False)
    raise typer.Exit(0)


RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", help="YAML recipe: a file or a shipped name (lemoe, …); flags override it.",
                              callback=show_set_help, is_eager=True)
]


SetOpt = Annotated[
    list[str] | None, typer.Option(
        "--set", help="Override one option of the method: --set KEY=VALUE (repeatable). --set help (or --set '?') "
                      "lists the method's options: name, type, default and what it does.",
        callback=show_set_help, is_eager=True)
]


LayerOpt = Annotated[int | None, typer.Option("--layer", help="Decoder layer to edit (default: the method's).")]


ExpertFormOpt = Annotated[str | None, typer.Option("--expert-form", help="dense | lowrank")]


LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate of the edit training.")]


StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Maximum training steps per batch.")]


# ---------------------------------------------------------------- option groups
# Options several commands share come in groups, each a dataclass (its defaults) with a table of its flags
# (`FLAGS`: field -> the Annotated option). `grouped` gives a command every option of the groups it names
# and hands each group to it as one argument, so a shared option is declared once and added in one place.


@dataclass
class ReadOptions:
    """How --data is read."""

    fmt: str | None = None
    skip_invalid: bool = False
    limit: int | None = None
    FLAGS: ClassVar[dict[str, object]] = {"fmt": FormatOpt, "skip_invalid": SkipOpt, "limit": LimitOpt}


@dataclass
class ModelOptions:
    """Which model, and where it runs."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    FLAGS: ClassVar[dict[str, object]] = {"model": ModelOpt, "device": DeviceOpt, "dtype": DtypeOpt,
                                          "device_map": DeviceMapOpt}


@dataclass
class EvalOptions:
    """How a run is measured and checked."""

    eval_batch_size: int = 64
    generate: bool = True
    chat: bool = False
    same_subject: int = 0
    fail_under: str | None = None
    junit: Path | None = None
    FLAGS: ClassVar[dict[str, object]] = {"eval_batch_size": EvalBatchOpt, "generate": GenerateOpt, "chat": ChatOpt,
                                          "same_subject": SameSubjectOpt, "fail_under": FailUnderOpt,
                                          "junit": JunitOpt}


@dataclass
class OutputOptions:
    """What is printed, and the seed."""

    as_json: bool = False
    quiet: bool = False
    seed: int = 0
    FLAGS: ClassVar[dict[str, object]] = {"as_json": JsonOpt, "quiet": QuietOpt, "seed": SeedOpt}

    @property
    def silent(self) -> bool:
        """No progress bars or tables: --quiet, or --json (whose stdout is the JSON alone)."""
        return self.quiet or self.as_json


@dataclass
class EditingOptions(ReadOptions, ModelOptions, EvalOptions, OutputOptions):
    """Every option of `edit`, `batch-edit` and `lifelong`: the shared groups, plus what they edit with and
    where the run goes."""

    method: str | None = None
    recipe: Path | None = None
    sets: list[str] | None = None
    layer: int | None = None
    expert_form: str | None = None
    lr: float | None = None
    max_steps: int | None = None
    adapter: Path | None = None
    out: Path | None = None
    FLAGS: ClassVar[dict[str, object]] = {
        "method": Annotated[str | None, typer.Option(
            "--method", help="memoe, lemoe, scen, ft, lora, grace, wise or locft (default: the recipe's, else memoe; "
                             "lifelong: lemoe).", callback=show_set_help, is_eager=True)],
        "recipe": RecipeOpt, "sets": SetOpt, "layer": LayerOpt, "expert_form": ExpertFormOpt, "lr": LrOpt,
        "max_steps": StepsOpt,
        "adapter": Annotated[Path | None, typer.Option("--adapter", help="Continue an existing adapter.")],
        "out": OutOpt, **ReadOptions.FLAGS, **ModelOptions.FLAGS, **EvalOptions.FLAGS, **OutputOptions.FLAGS,
    }


def grouped(**groups: type):
    """Give a command every option of the named groups (after its own options); the command receives each group
    as one argument of that name, e.g. `@grouped(read=ReadOptions)` → `def cmd(..., *, read: ReadOptions)`."""
    import functools
    import inspect
    import typing

    def wrap(fn):
        hints = typing.get_type_hints(fn, include_extras=True)  # the commands' annotations are strings
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name not in groups]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                    default=getattr(group(), name))
                  for group in groups.values() for name, kind in group.FLAGS.items()]

        @functools.wraps(fn)
        def command(**kwargs):
            made = {key: group(**{name: kwargs.pop(name) for name in group.FLAGS}) for key, group in groups.items()}
            return fn(**kwargs, **made)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        return command

    return wrap


editing_command = grouped(opts=EditingOptions)
