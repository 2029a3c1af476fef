"""The moecli command line: parse, call the engine, print. No editing logic lives here.

Exit codes: 0 success, 1 a run that failed, 2 bad input (one line on stderr, no traceback unless
`--debug`).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from moecli.cli.edit import batch_edit, edit, lifelong
from moecli.cli.inspect import ask, evaluate, revert, show
from moecli.cli.output import Interrupted, err_console
from moecli.cli.tools import calibrate, plan_order
from moecli.errors import RunError, UserError, one_line
from moecli.version import __version__
from moecli.world.commands import world_app

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



app.command()(evaluate)
app.command()(edit)
app.command("batch-edit")(batch_edit)
app.command()(lifelong)
app.command()(calibrate)
app.command("plan-order")(plan_order)
app.command()(ask)
app.command()(show)
app.command()(revert)


app.add_typer(world_app, name="world")


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
