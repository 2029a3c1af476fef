"""The run lock: exclusive use of an output directory by one moecli run (`RunLock`), and who holds it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moecli.errors import UserError

LOCK_NAME = ".moecli.lock"
_STALE_EMPTY_LOCK_S = 10.0
"""An unreadable lock younger than this is a run still writing it; older, a run that died doing so."""


class RunLock:
    """Exclusive use of an output dir by one moecli run, via `<out>/.moecli.lock`.

    Why: two runs writing the same `--out` would each swap in their own checkpoint and interleave
    ledgers and reports; the second run must be told at once, in one line. The lock file is made
    with O_CREAT|O_EXCL (atomic on local file systems) and records pid, host and start time, so a
    lock left by a killed run (its pid no longer alive on this host) is taken over, not obeyed
    forever. A lock from another host cannot be checked and is always obeyed.

        with RunLock(out):
            ...  # edit, save checkpoints, write reports
    """

    def __init__(self, out: str | Path, option: str = "--out") -> None:
        self.out = Path(out)
        self.lock_path = self.out / LOCK_NAME
        self.option = option
        self._token: str | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise `UserError` saying which run holds it."""
        if self._token is not None:
            raise RuntimeError("RunLock already held by this object")
        self.out.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        payload = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "token": token,
            }
        ).encode("utf-8")
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw = self._read_lock()
                if raw is None:
                    continue  # released between our attempt and the read: try again
                holder = self._live_holder(raw)
                if holder is not None:
                    raise UserError(busy_message(self.out, holder)) from None
                self._take_over(raw)
                continue
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._token = token
            return
        raise UserError(busy_message(self.out, "pid unknown"))

    def release(self) -> None:
        """Remove the lock if it is still ours (never someone else's that took over)."""
        if self._token is None:
            return
        raw = self._read_lock()
        if raw is not None and _parse_lock(raw).get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
        self._token = None

    def _read_lock(self) -> bytes | None:
        try:
            return self.lock_path.read_bytes()
        except FileNotFoundError:
            return None

    def _live_holder(self, raw: bytes) -> str | None:
        """Describe the holder if it may still be running; None when the lock is stale."""
        info = _parse_lock(raw)
        pid, host = info.get("pid"), info.get("host")
        if not isinstance(pid, int) or not isinstance(host, str):
            # Being written right now, or its writer died mid-write: age tells which.
            try:
                age = time.time() - self.lock_path.stat().st_mtime
            except FileNotFoundError:
                return None
            return "pid unknown" if age < _STALE_EMPTY_LOCK_S else None
        if host != socket.gethostname():
            return f"pid {pid} on {host}"
        return f"pid {pid}" if pid_alive(pid) else None

    def _take_over(self, stale: bytes) -> None:
        """Remove a stale lock without removing a fresh one another process made meanwhile.

        Rename is atomic, so only one contender moves the file away; the mover then checks it moved
        the stale lock it judged, and puts the file back if it was in fact a new, live one.
        """
        grave = self.out / f"{LOCK_NAME}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(self.lock_path, grave)
        except FileNotFoundError:
            return
        try:
            if grave.read_bytes() != stale:
                with contextlib.suppress(OSError):
                    os.link(grave, self.lock_path)
        finally:
            with contextlib.suppress(OSError):
                grave.unlink()


def busy_message(out: str | Path, holder: str) -> str:
    """The one line shown when `out` is locked by another run (`holder` says which)."""
    return f"{out} is in use by another moecli run ({holder}); wait for it to finish or pick another --out"


def lock_holder(out: str | Path) -> str | None:
    """Who holds the run lock of `out` ("pid 123", ...), or None when no live run does.

    For a check before the real `RunLock.acquire` (which alone is race-free): it lets a second run
    be told "in use" rather than misleading advice about the first run's half-written output.
    """
    lock = RunLock(out)
    raw = lock._read_lock()
    return None if raw is None else lock._live_holder(raw)


def _parse_lock(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


# ------------------------------------------------------------------------------------ helpers


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True
