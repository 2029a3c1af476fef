"""Shared test set-up: one torch thread (tiny models run faster without thread overhead on 2 cores),
`run_moecli`, the CLI run in-process, helpers for resume and shared data, and `--shuffle SEED`: the files
in a random order and the tests of each file too (what `make test-random` runs), so that no test can lean
on another's leftovers unnoticed. Files stay whole, so each module-scoped fixture is still built once."""

import os
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle", type=int, default=None, metavar="SEED",
                     help="run the test files, and the tests within each, in an order drawn from SEED")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    rng = random.Random(seed)
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.location[0], []).append(item)
    order = list(files.values())
    rng.shuffle(order)
    for tests in order:
        rng.shuffle(tests)
    items[:] = [item for tests in order for item in tests]


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--shuffle")
    return None if seed is None else f"shuffled with --shuffle {seed} (the same seed gives the same order)"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch generator state, whatever ran before it (MEMoE's gate noise and
    weight initialisations draw from it; the engine seeds it per batch, a test calling a method does not).
    A module-scoped fixture runs before this: one that trains seeds the generator itself."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _no_eval_cache():
    """Every test computes the unedited model's answers itself (a cache shared through ~/.cache would make a
    test's outcome depend on the runs before it); tests of the cache turn it on with their own cache root."""
    old = os.environ.get("MOECLI_EVAL_CACHE")
    os.environ["MOECLI_EVAL_CACHE"] = "off"
    yield
    if old is None:
        del os.environ["MOECLI_EVAL_CACHE"]
    else:
        os.environ["MOECLI_EVAL_CACHE"] = old


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_moecli(args: list[str], capsys, threads: int = 1) -> tuple[int, str, str]:
    """`moecli --threads N ARGS` in-process (torch and transformers imported once): (exit code, stdout,
    stderr)."""
    from moecli.cli.app import main

    capsys.readouterr()
    try:
        main(["--threads", str(threads), *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def shared_data(name: str) -> Path:
    """A file of the project's shared data (`$MOECLI_SHARED_DATA`, else `shared/data` beside the repository,
    where CI and every checkout have it); the test is skipped, saying where it looked, when it is absent."""
    env = os.environ.get("MOECLI_SHARED_DATA")
    path = (Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data") / name
    if not path.is_file():
        pytest.skip(f"real data {path} not found (set MOECLI_SHARED_DATA to the shared/data folder)")
    return path


@contextmanager
def batches_trained(monkeypatch):
    """Record the stream index of every batch the engine trains while the block runs. A resume must train
    only the batches its checkpoint lacks: one that started over would end with the same adapter, so
    comparing results alone cannot tell the two apart."""
    import moecli.engine.run as engine

    trained: list[int] = []
    real = engine.check_finite  # called once per trained batch, with its index, before the save

    def spy(stats, batch, out_dir):
        trained.append(batch)
        return real(stats, batch, out_dir)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "check_finite", spy)
        yield trained


def assert_same_adapter(a, b) -> None:
    """Two checkpoints (`moecli.engine.checkpoint.Checkpoint`) hold the same edits: tensor by tensor, file by file and
    ledger row by row (wall-clock fields aside)."""
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.files == b.files
    assert a.config == b.config

    def rows(ledger):
        return [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in ledger]

    assert rows(a.ledger) == rows(b.ledger)


def interrupter(when: str):
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) `after_save` (right after the second
    checkpoint) or `mid_batch` (inside the second batch's training, between two saves)."""
    saved = 0

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal saved
        if stage == "batches":
            saved = done
            if when == "after_save" and done == 2:
                raise KeyboardInterrupt
        elif when == "mid_batch" and saved == 1:
            raise KeyboardInterrupt

    return progress


def assert_resume_is_exact(spec, tmp_path: Path, monkeypatch, when: str, n_batches: int = 3) -> None:
    """A 3-batch stream `spec(out_dir)` (a RunSpec) interrupted `when` (see `interrupter`) and resumed ends with
    the adapter and summary of the same stream run without interruption, having trained only the batches its
    checkpoint lacked."""
    from moecli.engine.checkpoint import load_checkpoint
    from moecli.engine.run import load_run_spec, run_edits

    full = run_edits(spec(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        run_edits(spec(tmp_path / "cut"), progress=interrupter(when))
    manifest = load_checkpoint(tmp_path / "cut" / "adapter").manifest
    position = manifest["stream"]["position"]
    assert position == (2 if when == "after_save" else 1)
    with batches_trained(monkeypatch) as trained:
        resumed = run_edits(load_run_spec(tmp_path / "cut"), resume=True)
    assert trained == list(range(position, n_batches))  # only what the checkpoint lacked, not the stream again
    # the report's total is the whole run's: the interrupted process's time to its last save, then this one's
    assert resumed["timings"]["total"] >= manifest["timings"]["total"] + resumed["timings"]["evaluate_after"]
    assert_same_adapter(load_checkpoint(tmp_path / "full" / "adapter"), load_checkpoint(tmp_path / "cut" / "adapter"))
    assert resumed["summary"] == full["summary"]
