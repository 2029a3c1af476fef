"""Errors that the CLI turns into one line on stderr and an exit code.

Why a dedicated type: the engine must never print or exit, but bad input has to reach the user as
one readable line (exit 2), not a traceback. Everything the user can fix raises `UserError`.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix (file, field, option, model path). The CLI exits with code 2."""

    exit_code = 2


class RunError(Exception):
    """A run that failed for reasons other than bad input. The CLI exits with code 1."""

    exit_code = 1


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """An exception as one line (a file's text it quotes may hold newlines): its message with all whitespace
    collapsed, led by its type name with `with_type` (a foreign library's error, whose type says what failed);
    the type name alone when the message is empty."""
    message = " ".join(str(exc).split())
    if not message:
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}" if with_type else message


class NonFiniteTensor(ValueError):
    """A tensor to be written holds inf or NaN (a diverged training): the save is abandoned. Checked on what
    a save writes (with shards, what changed): the rest was checked when written, so it costs the batch."""

    def __init__(self, name: str) -> None:
        super().__init__(f"non-finite values in tensor {name!r}")
        self.name = name
