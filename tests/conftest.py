"""Shared test set-up: one torch thread (tiny models run faster without thread overhead on 2 cores), and
`run_moecli`, the CLI run in-process."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_moecli(args: list[str], capsys, threads: int = 1) -> tuple[int, str, str]:
    """`moecli --threads N ARGS` in-process (torch and transformers imported once): (exit code, stdout,
    stderr)."""
    from moecli.cli import main

    capsys.readouterr()
    try:
        main(["--threads", str(threads), *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
