"""Tests for moecli.engine.checkpoint: round trip, atomic replacement, crash recovery, the one-line errors
users see for damaged checkpoints, and the run lock.

Crashes are simulated by making a step inside `save_checkpoint` raise (the serialisation, or the
final rename), or by building on disk the exact state a kill between two renames leaves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moecli.engine.checkpoint as ck
from moecli.engine.checkpoint import FORMAT_VERSION, Checkpoint, load_checkpoint, resolve_adapter_dir, save_checkpoint
from moecli.engine.lock import LOCK_NAME, RunLock
from moecli.errors import UserError


def _ckpt(seed: int = 0, n_ledger: int = 3) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4, generator=g)
    return Checkpoint(
        config={"method": "memoe", "layer": 3, "experts": {"form": "ffn", "n": 2}, "lr": 1e-3, "seed": seed},
        tensors={
            "experts.0.w": torch.randn(4, 8, generator=g),
            "experts.1.w": torch.randn(4, 8, generator=g).to(torch.bfloat16),
            "router.keys": base[:3],  # a view sharing storage with the next one
            "router.bias": base[3:],
            "transposed": torch.randn(3, 5, generator=g).t(),  # not contiguous
            "counts": torch.arange(5, dtype=torch.int64),
            "empty": torch.zeros(0),
        },
        manifest={"format_version": FORMAT_VERSION, "base_model": {"sha256": "ab" * 32}, "seed": seed, "pos": 7},
        ledger=[{"id": f"e{i}", "prompt": f"Q{i} ünï", "target": "A\nB", "batch": i // 2} for i in range(n_ledger)],
        files={"anchors.faiss": bytes(range(256)) * 3 + bytes([seed]), "anchors.json": b'{"k": [1, 2]}'},
    )


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.config == b.config
    assert a.manifest == b.manifest
    assert a.ledger == b.ledger
    assert a.files == b.files
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(t.contiguous().view(torch.uint8), u.contiguous().view(torch.uint8)), name


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ------------------------------------------------------------------------------ round trip


def test_round_trip_is_exact(tmp_path: Path) -> None:
    c = _ckpt()
    out = save_checkpoint(tmp_path / "adapter", c)
    assert out == tmp_path / "adapter"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "ledger.jsonl", *c.files]
    )
    _assert_same(c, load_checkpoint(out))
    assert _siblings(out) == ["adapter"]  # no temp or .old dirs left behind


def test_every_file_gets_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """The weights were once written 0600 (a temporary file's mode) beside 0644 files: another user of a shared
    adapter could read its config but not its weights."""
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tmp_path / "adapter", _ckpt())
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


def test_save_sets_format_version_and_does_not_mutate_input(tmp_path: Path) -> None:
    c = _ckpt()
    del c.manifest["format_version"]
    before = dict(c.manifest)
    save_checkpoint(tmp_path / "a", c)
    assert c.manifest == before
    assert load_checkpoint(tmp_path / "a").manifest == {**before, "format_version": FORMAT_VERSION}


def test_files_are_peft_style_and_readable_without_moecli(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    save_checkpoint(tmp_path / "a", _ckpt())
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["method"] == "memoe"
    assert "experts.0.w" in load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    lines = (tmp_path / "a" / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["e0", "e1", "e2"]


def test_long_ledger_round_trip(tmp_path: Path) -> None:
    c = _ckpt(n_ledger=100_000)
    save_checkpoint(tmp_path / "a", c)
    assert load_checkpoint(tmp_path / "a").ledger == c.ledger


def test_empty_checkpoint_round_trip(tmp_path: Path) -> None:
    c = Checkpoint(config={}, tensors={}, manifest={"format_version": FORMAT_VERSION})
    save_checkpoint(tmp_path / "a", c)
    _assert_same(c, load_checkpoint(tmp_path / "a"))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "manifest.json", "ledger.jsonl"])
def test_bad_extra_file_names_refused(tmp_path: Path, name: str) -> None:
    c = _ckpt()
    c.files[name] = b"x"
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "a", c)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------- atomic replacement


def test_save_over_existing_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    save_checkpoint(path, _ckpt(seed=1))
    new = _ckpt(seed=2, n_ledger=5)
    new.files = {"other.bin": b"new"}  # an extra file of the old one must not survive
    save_checkpoint(path, new)
    _assert_same(new, load_checkpoint(path))
    assert not (path / "anchors.faiss").exists()
    assert _siblings(path) == ["adapter"]


def test_save_refuses_to_replace_a_non_checkpoint_dir(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    (path / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a moecli checkpoint"):
        save_checkpoint(path, _ckpt())
    assert (path / "thesis.tex").read_text() == "precious"


def test_failure_in_serialisation_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "adapter"
    old = _ckpt(seed=1)
    save_checkpoint(path, old)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, _ckpt(seed=2))
    _assert_same(old, load_checkpoint(path))
    assert _siblings(path) == ["adapter"]


def test_failure_in_final_swap_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "adapter"
    old = _ckpt(seed=1)
    save_checkpoint(path, old)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        if Path(src).name.startswith(".adapter.tmp-") and Path(dst) == path:
            calls.append(src)
            raise KeyboardInterrupt  # Ctrl-C at the worst moment
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _ckpt(seed=2))
    monkeypatch.undo()
    assert calls, "the final swap was not reached"
    _assert_same(old, load_checkpoint(path))
    assert _siblings(path) == ["adapter"]


def test_recovery_after_crash_between_renames(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    old = _ckpt(seed=1)
    save_checkpoint(path, old)
    # The state a kill leaves after "rename path -> .old" and before "rename temp -> path":
    os.replace(path, tmp_path / ".adapter.old")
    (tmp_path / ".adapter.tmp-999999999-dead").mkdir()  # the temp dir of the killed process
    (tmp_path / ".adapter.tmp-999999999-dead" / "manifest.json").write_text("{")
    assert resolve_adapter_dir(path) == path
    assert resolve_adapter_dir(tmp_path) == path  # the run dir form too
    _assert_same(old, load_checkpoint(tmp_path))
    assert path.is_dir() and not (tmp_path / ".adapter.old").exists()  # restored in place
    # The next save cleans the leftover temp dir.
    save_checkpoint(path, _ckpt(seed=3))
    assert _siblings(path) == ["adapter"]


def test_recovery_reads_old_in_place_while_a_save_is_running(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    old = _ckpt(seed=1)
    save_checkpoint(path, old)
    os.replace(path, tmp_path / ".adapter.old")
    # A temp dir owned by a live process (the parent of this test) means a save is mid-swap:
    # moving .old back would make that save's last rename fail, so the loader only reads.
    (tmp_path / f".adapter.tmp-{os.getppid()}-live").mkdir()
    _assert_same(old, load_checkpoint(path))
    assert not path.exists() and (tmp_path / ".adapter.old").is_dir()


def test_save_after_crash_between_renames(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    save_checkpoint(path, _ckpt(seed=1))
    os.replace(path, tmp_path / ".adapter.old")
    new = _ckpt(seed=2)
    save_checkpoint(path, new)
    _assert_same(new, load_checkpoint(path))
    assert _siblings(path) == ["adapter"]


def test_stale_old_after_crash_before_cleanup_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    save_checkpoint(path, _ckpt(seed=1))
    current = _ckpt(seed=2)
    save_checkpoint(path, current)
    save_checkpoint(tmp_path / ".adapter.old", _ckpt(seed=1))  # killed before removing .old
    _assert_same(current, load_checkpoint(path))  # the new one wins
    save_checkpoint(path, current)
    assert _siblings(path) == ["adapter"]


# ------------------------------------------------------------------------------ load errors


def _saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "adapter", _ckpt())


def _rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def _refresh_contents(path: Path, name: str) -> None:
    """Make the manifest agree with a damaged file, to reach the parser's own error."""
    m = json.loads((path / "manifest.json").read_text())
    m["contents"][name] = {"size": (path / name).stat().st_size, "sha256": ck._sha256(path / name)}
    (path / "manifest.json").write_text(json.dumps(m))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--adapter .*nope: no such directory$"):
        load_checkpoint(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a moecli checkpoint"):
        load_checkpoint(tmp_path / "x")
    with pytest.raises(UserError, match="is a file"):
        load_checkpoint(tmp_path / "x" / "notes.txt")


def test_option_name_appears_in_messages(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--resume "):
        load_checkpoint(tmp_path / "nope", option="--resume")


@pytest.mark.parametrize(
    "name", ["adapter_config.json", "adapter_model.safetensors", "ledger.jsonl", "anchors.faiss", "manifest.json"]
)
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    path = _saved(tmp_path)
    (path / name).unlink()
    with pytest.raises(UserError, match=f"missing {name}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "name", ["adapter_config.json", "adapter_model.safetensors", "ledger.jsonl", "anchors.faiss", "manifest.json"]
)
def test_truncated_file_is_named(tmp_path: Path, name: str) -> None:
    path = _saved(tmp_path)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{name} is (truncated or )?corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "anchors.faiss", "ledger.jsonl"])
def test_same_size_damage_is_caught_by_checksum(tmp_path: Path, name: str) -> None:
    path = _saved(tmp_path)
    data = bytearray((path / name).read_bytes())
    at = data.rfind(b"e2") + 1 if name == "ledger.jsonl" else len(data) - 2  # still valid JSON
    data[at] ^= 0x01  # one flipped bit, size unchanged
    (path / name).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{name} is corrupt .*SHA-256"):
        load_checkpoint(path)


def test_bad_json_config_reports_position(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "adapter_config.json").write_text('{"method": "memoe",\n  "layer": }\n')
    _refresh_contents(path, "adapter_config.json")
    with pytest.raises(UserError, match=r"adapter_config.json is corrupt \(bad JSON at line 2"):
        load_checkpoint(path)


def test_bad_ledger_line_reports_line_number(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with open(path / "ledger.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "e3", "prom')  # a write cut short
    _refresh_contents(path, "ledger.jsonl")
    with pytest.raises(UserError, match=r"ledger.jsonl is corrupt \(bad JSON on line 4"):
        load_checkpoint(path)


def test_safetensors_header_error(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{not a header")
    _refresh_contents(path, "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"adapter_model.safetensors is corrupt \(safetensors: ") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_manifest_bad_json(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        load_checkpoint(path)


def test_newer_format_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite_manifest(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(UserError, match=rf"newer moecli \(format {FORMAT_VERSION + 1} > {FORMAT_VERSION}\); upgrade"):
        load_checkpoint(path)


def test_missing_format_version_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    del m["format_version"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="no format_version"):
        load_checkpoint(path)


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (tmp_path / "secret").write_bytes(b"s")
    m = json.loads((path / "manifest.json").read_text())
    m["contents"]["../secret"] = {"size": 1, "sha256": ck._sha256(tmp_path / "secret")}
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        load_checkpoint(path)


def test_peft_adapter_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(UserError, match="missing manifest.json"):
        load_checkpoint(tmp_path / "lora")


# --------------------------------------------------------------------------- resolve_adapter_dir


def test_resolve_adapter_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    adapter = save_checkpoint(run / "adapter", _ckpt())
    (run / "report.json").write_text("{}")
    assert resolve_adapter_dir(adapter) == adapter
    assert resolve_adapter_dir(run) == adapter
    assert resolve_adapter_dir(str(run)) == adapter
    _assert_same(_ckpt(), load_checkpoint(run))
    with pytest.raises(UserError, match="no such directory"):
        resolve_adapter_dir(tmp_path / "missing")
    with pytest.raises(UserError, match="not a moecli checkpoint"):
        resolve_adapter_dir(tmp_path)


# ---------------------------------------------------------------------------------- RunLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped, so no process has it (pids are not reused this quickly)


def test_lock_refuses_second_run_and_is_released(tmp_path: Path) -> None:
    with RunLock(tmp_path / "out") as lock:
        info = json.loads(lock.lock_path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with pytest.raises(UserError, match=rf"in use by another moecli run \(pid {os.getpid()}\); wait for it"):
            with RunLock(tmp_path / "out"):
                pass
        assert lock.lock_path.exists()  # the refused attempt did not remove the holder's lock
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    with RunLock(tmp_path / "out"):  # free again
        pass


def test_lock_released_after_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="training blew up"):
        with RunLock(tmp_path):
            raise RuntimeError("training blew up")
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00", "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.lock_path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_of_other_host_is_obeyed(tmp_path: Path) -> None:
    other = {"pid": _dead_pid(), "host": "elsewhere.example", "started": "2020-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(UserError, match=r"on elsewhere.example\)"):
        RunLock(tmp_path).acquire()


def test_unreadable_lock_young_is_obeyed_old_is_taken_over(tmp_path: Path) -> None:
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_bytes(b"")  # a run between O_EXCL create and writing its pid
    with pytest.raises(UserError, match=r"pid unknown"):
        RunLock(tmp_path).acquire()
    os.utime(lock_file, (1_000_000_000, 1_000_000_000))  # its writer died long ago
    with RunLock(tmp_path):
        pass
    assert not lock_file.exists()


def test_release_does_not_remove_a_lock_taken_over_by_another(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "token": "theirs"}))
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_ledger_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with open(path / "ledger.jsonl", "a", encoding="utf-8") as fh:
        fh.write("[1, 2]\n")
    _refresh_contents(path, "ledger.jsonl")
    with pytest.raises(UserError, match=r"ledger.jsonl is corrupt \(line 4 is not a JSON object\)"):
        load_checkpoint(path)


def test_load_retries_when_a_save_swaps_the_dir_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "adapter", _ckpt(seed=1))
    new = _ckpt(seed=2, n_ledger=9)
    real_read_ledger = ck._read_ledger
    swapped = []

    def read_ledger_with_concurrent_save(file, fail):
        if not swapped:  # another run saves between our reading the manifest and the ledger
            swapped.append(True)
            save_checkpoint(path, new)
        return real_read_ledger(file, fail)

    monkeypatch.setattr(ck, "_read_ledger", read_ledger_with_concurrent_save)
    _assert_same(new, load_checkpoint(path))
    assert swapped


def test_lock_of_live_process_on_this_host_is_obeyed(tmp_path: Path) -> None:
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(UserError, match=rf"^{tmp_path} is in use by another moecli run \(pid {os.getppid()}\)"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == live
