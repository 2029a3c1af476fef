"""The adapter checkpoint directory: save, load, recover (the run lock that guards an output dir: `lock`).

A checkpoint is a small directory, PEFT-style, that any method writes the same way:

    adapter/
      adapter_config.json        what the adapter is (method, layer, expert form, router, hyper-parameters)
      adapter_model.safetensors  its tensors (with older shards adapter_model-NNNNN.safetensors: `shards`)
      manifest.json              how it was made (base model fingerprint, recipe, seed, stream position, ...)
      ledger.jsonl               one JSON object per applied edit, in order
      <extra files>              named blobs a method needs (e.g. the anchor trie)

Why a whole-directory swap rather than file-by-file atomic writes: the files only make sense
together (a ledger that lists 500 edits beside tensors that hold 480 of them is a silently wrong
adapter). So a save writes the complete set into a fresh sibling temp dir, fsyncs it, and then
swaps directories with two renames. Whatever moment a run is killed, one complete checkpoint is on
disk: the new one, the previous one at its place, or the previous one at `.<name>.old` (killed
between the two renames), which `load_checkpoint` finds and the next save finishes replacing.

Why a manifest with sizes and SHA-256 of every file: a disk that filled up, a copy cut short or a
hand edit must be reported as "this file is corrupt", naming it, not as a strange failure later.
The method code never sees this bookkeeping; it is added on save and removed on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moecli.engine import shards
from moecli.engine.lock import pid_alive
from moecli.errors import NonFiniteTensor, UserError
from moecli.fsutil import atomic_write_bytes, atomic_write_json, json_lines

FORMAT_VERSION = 2
"""Version of the directory layout. Bump it when an older moecli could misread a new checkpoint.
2: tensors in shards and row pieces (`shards`); an older moecli would read only the newest shard."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = shards.WEIGHTS_NAME
MANIFEST_NAME = "manifest.json"
LEDGER_NAME = "ledger.jsonl"
CORE_NAMES = (CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME, LEDGER_NAME)
RUN_ADAPTER_SUBDIR = "adapter"

_CONTENTS_KEY = "contents"
"""Manifest key holding {file name: {"size", "sha256"}} for every file except the manifest itself.
Reserved: written by `save_checkpoint`, checked and removed by `load_checkpoint`."""

DAMAGED_HINT = "; the checkpoint is damaged: restore it from a copy or redo the edits"
"""Appended to every message about a missing or corrupt checkpoint file: what the user can do."""


@dataclass
class Checkpoint:
    """Everything an adapter checkpoint holds, independent of the editing method.

    `manifest` must end up with "format_version": `save_checkpoint` always writes `FORMAT_VERSION`
    (it writes the current format whatever the manifest came from). JSON round trips turn tuples
    into lists; everything else comes back equal, and tensors bit for bit (on the CPU).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- save


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` to the directory `path`, replacing any checkpoint there as one atomic step.

    Readers and a later `load_checkpoint` see either the previous checkpoint or the new one, whole.
    On any failure (an exception, a full disk) the previous checkpoint is left loadable and the temp
    dir is removed; a hard kill leaves a temp dir that the next save to the same path cleans up.
    Refuses to replace a non-empty directory that is not a checkpoint (it would be deleted).
    Returns the checkpoint path.
    """
    path = Path(path)
    _check_for_save(ckpt)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = _old_path(path)
    if path.exists() and not _looks_like_checkpoint(path) and not _is_empty_dir(path):
        raise UserError(f"{path} exists and is not a moecli checkpoint; refusing to replace it (pick another --out)")
    _clean_leftovers(path)

    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    moved_old = False
    try:
        layout = _write_contents(tmp, ckpt, path)
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
            moved_old = True
            _fsync_dir(parent)
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        if moved_old and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The new checkpoint is in place; `.old` is either the one we moved or one left by an earlier
    # crash between the renames. Either way it is superseded now.
    shards.remember(path, layout)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _check_for_save(ckpt: Checkpoint) -> None:
    """Programming errors, caught before anything is written: they are bugs, not bad user input."""
    if not isinstance(ckpt.config, dict) or not isinstance(ckpt.manifest, dict):
        raise TypeError("Checkpoint.config and Checkpoint.manifest must be dicts")
    if _CONTENTS_KEY in ckpt.manifest:
        raise ValueError(f"manifest key {_CONTENTS_KEY!r} is reserved for the checkpoint's own file list")
    for name, t in ckpt.tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"Checkpoint.tensors must map str to torch.Tensor (bad entry {name!r})")
        shards.check_name(name)
    for i, entry in enumerate(ckpt.ledger):
        if not isinstance(entry, dict):
            raise TypeError(f"Checkpoint.ledger[{i}] must be a dict, not {type(entry).__name__}")
    for name, blob in ckpt.files.items():
        _check_file_name(name)
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"Checkpoint.files[{name!r}] must be bytes, not {type(blob).__name__}")


def _check_file_name(name: str) -> None:
    """Extra files are plain names inside the checkpoint dir: no paths, no hidden names, no clash."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or name in CORE_NAMES
        or shards.is_shard_name(name)
    ):
        raise ValueError(f"bad checkpoint file name {name!r}: use a plain, non-hidden name other than {CORE_NAMES}")


def _write_contents(tmp: Path, ckpt: Checkpoint, path: Path) -> shards.Layout:
    """Write every file into the fresh dir `tmp`, each fsynced, the manifest (with checksums) last; the
    tensors only where they changed since this process last saved `path` (`shards`)."""
    atomic_write_json(tmp / CONFIG_NAME, ckpt.config)
    weights, layout = shards.write(tmp, path, ckpt.tensors, shards.previous_layout(path), _write_tensors, _sha256)
    atomic_write_bytes(tmp / LEDGER_NAME, json_lines(ckpt.ledger))
    for name, blob in ckpt.files.items():
        atomic_write_bytes(tmp / name, bytes(blob))
    manifest = dict(ckpt.manifest)
    manifest["format_version"] = FORMAT_VERSION
    # Checksums are taken from what landed on disk, so they also vouch for the write itself (a linked
    # shard keeps the checksum taken when it was written).
    manifest[_CONTENTS_KEY] = {**weights, **{n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                                             for n in [CONFIG_NAME, LEDGER_NAME, *ckpt.files]}}
    atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return layout


def _write_tensors(target: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors wants contiguous CPU tensors that share no storage; give it exactly that.

    Written straight into the temp dir (no bytes copy of a possibly large file in memory), then
    fsynced. Tensors that share storage with an earlier one (views, tied weights) are cloned.
    """
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteTensor(shards.tensor_name(name))
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen_storages.add(ptr)
        prepared[name] = t
    try:
        save_file(prepared, str(target), metadata={"format": "pt"})
    except Exception as exc:
        # safetensors reports a full disk as its own SafetensorError "... (os error 28)": make it the
        # OSError it is, so that callers handle every failed write the same way.
        code = re.search(r"os error (\d+)", str(exc))
        if isinstance(exc, OSError) or code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(target)) from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(target, 0o666 & ~umask)  # safetensors writes 0600; every other file of the checkpoint has the umask's
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------- load


def resolve_adapter_dir(path: str | Path, option: str = "--adapter") -> Path:
    """The checkpoint dir behind `path`: the adapter dir itself, or `<run dir>/adapter`.

    Users pass whichever they have at hand (the `--out` of an edit run or the adapter inside it).
    A checkpoint that only survives as `.<name>.old` (a crash between the save's two renames)
    counts as present: `load_checkpoint` recovers it. `option` names the flag in error messages.
    """
    path = Path(path)
    if _looks_like_checkpoint(path) or _recoverable(path):
        return path
    sub = path / RUN_ADAPTER_SUBDIR
    if path.is_dir() and (sub.is_dir() or _recoverable(sub)):
        return sub
    if not path.exists():
        raise UserError(f"{option} {path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a checkpoint directory")
    raise UserError(
        f"{option} {path}: not a moecli checkpoint (no {MANIFEST_NAME}, and no {RUN_ADAPTER_SUBDIR}/ inside)"
    )


def inside_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory that `path` lies in (or is), if any: such a place is replaced whole by the
    checkpoint's next save or revert, so no run may write there."""
    here = Path(path).absolute()
    for d in (here, *here.parents):
        if _looks_like_checkpoint(d):
            return d
    return None


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a checkpoint is at `path`, counting one a killed save left at `.<name>.old`."""
    path = Path(path)
    return path.exists() or _recoverable(path)


def load_checkpoint(path: str | Path, option: str = "--adapter") -> Checkpoint:
    """Read and validate the checkpoint at `path` (an adapter dir or a run dir containing one).

    Every problem a user can meet (a wrong path, a missing or damaged file, a checkpoint from a
    newer moecli) raises `UserError` with one line naming the file. If a save was killed between
    its two renames, the previous checkpoint is read from `.<name>.old` and put back in place.
    If another process swaps the directory while we read it (a running edit saving its next
    checkpoint), the read is retried on the new directory rather than reported as damage.
    """
    path = resolve_adapter_dir(path, option)
    for attempt in range(3):
        where = _recover(path)
        before = shards.dir_id(where)
        try:
            return _load_dir(path, where, option)
        except (UserError, FileNotFoundError) as exc:
            if shards.dir_id(where) == before:
                if isinstance(exc, FileNotFoundError):
                    name = Path(exc.filename or "?").name
                    raise UserError(f"{option} {path}: missing {name}{DAMAGED_HINT}") from None
                raise
            if attempt == 2:
                raise UserError(
                    f"{option} {path}: keeps changing while being read (is another run saving it?)"
                ) from None
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _load_dir(path: Path, where: Path, option: str) -> Checkpoint:
    """One read of the checkpoint files in `where` (`path` itself, or its `.old` during recovery)."""

    def fail(msg: str) -> UserError:
        if msg.startswith("missing ") or " corrupt" in msg:
            msg += DAMAGED_HINT
        return UserError(f"{option} {path}: {msg}")

    if not where.is_dir():
        raise fail("no such directory")
    if not _looks_like_checkpoint(where):
        raise fail(f"not a moecli checkpoint (no {MANIFEST_NAME} or {CONFIG_NAME})")

    # The manifest first: a newer format may lay files out differently, so refuse before judging them.
    manifest = _read_json_object(where, MANIFEST_NAME, fail)
    version = manifest.get("format_version")
    if version is None:
        raise fail(f"{MANIFEST_NAME} has no format_version; not a moecli checkpoint")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"{MANIFEST_NAME} is corrupt (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise fail(f"made by a newer moecli (format {version} > {FORMAT_VERSION}); upgrade moecli")
    contents = manifest.pop(_CONTENTS_KEY, None)
    if not _valid_contents(contents):
        raise fail(f"{MANIFEST_NAME} is corrupt (no valid {_CONTENTS_KEY!r} file list)")

    for name in (CONFIG_NAME, WEIGHTS_NAME, LEDGER_NAME):
        if name not in contents:
            raise fail(f"{MANIFEST_NAME} is corrupt ({name} missing from its file list)")
    for name in contents:
        if not (where / name).is_file():
            raise fail(f"missing {name}")
    for name, meta in contents.items():
        size = (where / name).stat().st_size
        if size != meta["size"]:
            raise fail(f"{name} is truncated or corrupt ({size} bytes, expected {meta['size']})")

    # Parse before comparing checksums: "bad JSON at line 3" helps more than "checksum mismatch".
    config = _read_json_object(where, CONFIG_NAME, fail)
    tensors = shards.read(where, [n for n in contents if shards.is_shard_name(n)], fail)
    ledger = _read_ledger(where / LEDGER_NAME, fail)
    for name, meta in contents.items():
        if _sha256(where / name) != meta["sha256"]:
            raise fail(f"{name} is corrupt (SHA-256 does not match {MANIFEST_NAME}; edited by hand?)")
    files = {name: (where / name).read_bytes() for name in contents
             if name not in (CONFIG_NAME, LEDGER_NAME) and not shards.is_shard_name(name)}
    return Checkpoint(config=config, tensors=tensors, manifest=manifest, ledger=ledger, files=files)


def _read_json_object(where: Path, name: str, fail) -> dict[str, Any]:
    file = where / name
    if not file.is_file():
        raise fail(f"missing {name}")
    try:
        obj = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise fail(f"{name} is corrupt (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise fail(f"{name} is corrupt (bad JSON at line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    if not isinstance(obj, dict):
        raise fail(f"{name} is corrupt (expected a JSON object, got {type(obj).__name__})")
    return obj


def _read_ledger(file: Path, fail) -> list[dict[str, Any]]:
    """Parse ledger.jsonl; on a bad line, report its number (a truncated last line is the usual one).

    Fast path: the lines joined into one JSON array, parsed by one C-level call (about 3x faster
    than a call per line on 100k lines). It is accepted only when it yields one object per line;
    otherwise the line-by-line parse decides, and names the first bad line.
    """
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"{LEDGER_NAME} is corrupt (not UTF-8 text)") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        fast = json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        fast = None
    if isinstance(fast, list) and len(fast) == len(lines) and all(isinstance(e, dict) for e in fast):
        return fast
    ledger: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail(f"{LEDGER_NAME} is corrupt (bad JSON on line {lineno}: {exc.msg})") from None
        if not isinstance(entry, dict):
            raise fail(f"{LEDGER_NAME} is corrupt (line {lineno} is not a JSON object)")
        ledger.append(entry)
    return ledger


def _valid_contents(contents: Any) -> bool:
    if not isinstance(contents, dict):
        return False
    for name, meta in contents.items():
        if not isinstance(name, str) or not isinstance(meta, dict):
            return False
        if name != MANIFEST_NAME and name not in CORE_NAMES and not shards.is_shard_name(name):
            try:
                _check_file_name(name)
            except ValueError:
                return False  # a path like "../x" in a manifest must never be read
        if not isinstance(meta.get("size"), int) or not isinstance(meta.get("sha256"), str):
            return False
    return MANIFEST_NAME not in contents



# ------------------------------------------------------------------------------ crash recovery


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _looks_like_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_NAME).is_file() or (path / CONFIG_NAME).is_file())


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _recoverable(path: Path) -> bool:
    """`path` is gone but its previous version waits at `.<name>.old` (killed between renames)."""
    return not path.exists() and _old_path(path).is_dir()


def _recover(path: Path) -> Path:
    """The directory to read for `path`: put `.old` back in place if that is safe, else read it there.

    Safe means no live process is mid-save on this path (its temp dir would be present): moving
    `.old` back under a running save would make the save's final rename fail.
    """
    if not _recoverable(path):
        return path
    old = _old_path(path)
    if _live_temp_dirs(path):
        return old
    try:
        os.replace(old, path)
        _fsync_dir(path.parent)
    except OSError:
        return old if old.is_dir() else path  # read-only place, or someone else restored it first
    return path


def _temp_dirs(path: Path) -> list[tuple[Path, int | None]]:
    prefix = _tmp_prefix(path)
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix):
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            found.append((entry, int(pid_text) if pid_text.isdigit() else None))
    return found


def _live_temp_dirs(path: Path) -> list[Path]:
    me = os.getpid()
    return [d for d, pid in _temp_dirs(path) if pid is not None and pid != me and pid_alive(pid)]


def _clean_leftovers(path: Path) -> None:
    """Remove what crashed saves left: temp dirs of dead processes, and a `.old` already superseded."""
    for d, pid in _temp_dirs(path):
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    old = _old_path(path)
    if path.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
