"""How a checkpoint's tensors are laid into files, so that a save costs what changed, not what exists.

A lifelong run saves its checkpoint after every batch, and most of the adapter never changes again:
LEMoE freezes each batch's expert, and the key matcher's tables only grow. Written whole each time, the
save grew with the stream (0.6-0.8 s per batch at 4,000 SmolLM2 edits, against under 0.1 s at the
start). So the tensors are stored in shards:

    adapter_model.safetensors          what changed since the previous save (all of it, at a first save)
    adapter_model-00003.safetensors    the rest, in shards never rewritten in place: a new checkpoint
                                       hard-links the old ones and adds one for what is new

A tensor that only grew along its first dimension is stored as row pieces (`name`, then
`name@rows:<start>` for the rows added later), so only its new rows are written. A new shard absorbs
the one before it whenever it is at least half that one's size (an LSM-style merge), which keeps the
number of shards logarithmic in the adapter's size and rewrites each byte a logarithmic number of
times. A tensor that changes at every save (a shared router) sits alone in `adapter_model.safetensors`,
so it never drags a large shard into a rewrite.

What "unchanged" means: the process that wrote the previous checkpoint of a directory remembers, for
each stored piece, a tensor holding its rows (a view into the newest tensor of that name) and that
tensor's version counter (PyTorch bumps it on every in-place change, through any view). A tensor is
unchanged when it is that very tensor, at the same version, or when its rows equal the stored pieces
(`torch.equal`: a memory comparison, much cheaper than a write). A new process (a resumed run)
remembers nothing: its first save writes all.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from moecli.errors import one_line

WEIGHTS_NAME = "adapter_model.safetensors"
_SHARD_RE = re.compile(r"adapter_model-\d{5}\.safetensors")
_ROWS = "@rows:"
MAX_SHARDS = 24  # a bound on open files per load, whatever the merge rule leaves


def is_shard_name(name: str) -> bool:
    """A weights file of a checkpoint: the newest shard or an older one."""
    return name == WEIGHTS_NAME or _SHARD_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of tensor `name`, stored under `key`; `tensor` holds exactly those rows (a view
    into the newest tensor of that name, held so that its memory cannot be reused by another tensor while
    we compare against it)."""

    name: str
    key: str
    start: int
    stop: int
    tensor: torch.Tensor
    version: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass
class _Shard:
    file: str
    size: int
    sha256: str
    keys: list[str]


@dataclass
class Layout:
    """What one save laid down in a checkpoint directory (identified by its inode)."""

    dir_id: tuple[int, int] | None = None
    shards: list[_Shard] = field(default_factory=list)  # oldest first; the last is WEIGHTS_NAME
    pieces: dict[str, list[_Piece]] = field(default_factory=dict)  # tensor name -> pieces in row order
    next_seq: int = 1


_LAYOUTS: dict[str, Layout] = {}  # resolved checkpoint path -> what this process last saved there


def dir_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def previous_layout(path: Path) -> Layout | None:
    """What this process last saved at `path`, if that checkpoint is still the one there, untouched."""
    layout = _LAYOUTS.get(str(path.resolve()))
    if layout is None or layout.dir_id is None or dir_id(path) != layout.dir_id:
        return None
    for s in layout.shards:
        f = path / s.file
        if not f.is_file() or f.stat().st_size != s.size:
            return None
    return layout


def remember(path: Path, layout: Layout) -> None:
    """Called once the new checkpoint is in place at `path`."""
    layout.dir_id = dir_id(path)
    _LAYOUTS[str(path.resolve())] = layout


def forget(path: Path) -> None:
    _LAYOUTS.pop(str(path.resolve()), None)


def _same_tensor(old: list[_Piece], t: torch.Tensor) -> bool:
    """Whether `t` is the very tensor `old` holds, whole and unchanged since (the common case, so the cheap test:
    a stream's frozen experts, a few thousand tensors at 10,000 edits)."""
    if len(old) != 1:
        return False
    p = old[0]
    first = p.tensor
    return t.data_ptr() == first.data_ptr() and t._version == p.version == first._version and \
        t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype and t.device == first.device


def _same_rows(old: list[_Piece], t: torch.Tensor) -> bool:
    """Whether `t` is what `old` stored, possibly with rows appended."""
    if not old or any(p.tensor._version != p.version for p in old):
        return False
    first = old[0].tensor
    if t.dim() == 0 or t.dtype != first.dtype or t.shape[1:] != first.shape[1:] or t.shape[0] < old[-1].stop:
        return False
    return all(torch.equal(t[p.start : p.stop].to(p.tensor.device), p.tensor) for p in old)


def plan(tensors: dict[str, torch.Tensor], previous: Layout | None
         ) -> tuple[list[_Shard], list[_Piece], list[_Piece], Layout]:
    """Which old shards the new checkpoint keeps as they are, which pieces go into a new shard (new
    tensors, new rows, and what a shard being rewritten still holds), which pieces changed (they go to
    WEIGHTS_NAME, rewritten at every save while they keep changing, so they never drag a large shard
    along), and the layout that results (its shard list is filled in by `write`)."""
    prev_pieces = previous.pieces if previous else {}
    kept: dict[str, list[_Piece]] = {}
    fresh: list[_Piece] = []
    changed: list[_Piece] = []
    for name, t in tensors.items():
        t = t.detach()
        old = prev_pieces.get(name)
        if old and _same_tensor(old, t):
            kept[name] = old  # its piece already holds this storage: nothing to re-point
        elif old and _same_rows(old, t):
            # the pieces now point into `t` (equal to what they hold): one copy of a grown table is held, not a
            # small tensor per save (with those, 300 saves of a LEMoE-shaped stream ended at 520 MB RSS against
            # 397 MB written whole; now 407 MB)
            kept[name] = [replace(p, tensor=t[p.start : p.stop] if t.dim() else t, version=t._version) for p in old]
            rows = old[-1].stop
            if t.dim() and t.shape[0] > rows:  # grown: only the new rows are written
                fresh.append(_Piece(name, f"{name}{_ROWS}{rows}", rows, t.shape[0], t[rows:], t._version))
        else:
            (changed if old else fresh).append(_Piece(name, name, 0, t.shape[0] if t.dim() else 1, t, t._version))
    if previous is None:  # a first save: one file, as a one-shot adapter has
        fresh, changed = [], fresh
    kept_by_key = {p.key: p for ps in kept.values() for p in ps}
    clean: list[_Shard] = []
    for s in previous.shards if previous else []:
        if all(k in kept_by_key for k in s.keys):
            clean.append(s)
        else:  # a shard holding something changed or dropped is rewritten: its kept pieces move to the new one
            fresh += [kept_by_key[k] for k in s.keys if k in kept_by_key]
    pending = sum(p.nbytes for p in fresh)
    while fresh and clean and (2 * pending >= clean[-1].size or len(clean) >= MAX_SHARDS):
        s = clean.pop()
        fresh += [kept_by_key[k] for k in s.keys]
        pending += s.size
    fresh = _joined(fresh, tensors)
    pieces: dict[str, list[_Piece]] = {name: [] for name in tensors}
    for p in [*(kept_by_key[k] for s in clean for k in s.keys), *fresh, *changed]:
        pieces[p.name].append(p)
    for ps in pieces.values():
        ps.sort(key=lambda p: p.start)
    layout = Layout(pieces=pieces, next_seq=previous.next_seq if previous else 1)
    return clean, fresh, changed, layout


def _joined(fresh: list[_Piece], tensors: dict[str, torch.Tensor]) -> list[_Piece]:
    """`fresh` with the pieces of a tensor that follow one another in its rows joined into one (what they hold
    are rows of that tensor as it is now). Without this a grown table kept one piece per save that grew it, and
    the comparison of a save went over all of them (5,850 pieces per save at 10,000 edits, 0.13 s); joined, a
    table has at most one piece per shard."""
    by_name: dict[str, list[_Piece]] = {}
    for p in fresh:
        by_name.setdefault(p.name, []).append(p)
    out: list[_Piece] = []
    for name, ps in by_name.items():
        ps.sort(key=lambda p: p.start)
        runs = [[ps[0]]]
        for p in ps[1:]:
            if p.start == runs[-1][-1].stop:
                runs[-1].append(p)
            else:
                runs.append([p])
        t = tensors[name].detach()
        for run in runs:
            if len(run) == 1:
                out.append(run[0])
                continue
            start, stop = run[0].start, run[-1].stop
            out.append(_Piece(name, name if start == 0 else f"{name}{_ROWS}{start}", start, stop, t[start:stop],
                              t._version))
    return out


def write(tmp: Path, source: Path, tensors: dict[str, torch.Tensor], previous: Layout | None,
          write_file, sha256) -> tuple[dict[str, dict], Layout]:
    """Lay `tensors` into the new checkpoint dir `tmp`: old shards linked from `source` (the checkpoint
    being replaced), the rest written by `write_file(path, {key: tensor})`. Returns the manifest's
    entries for the weights files ({name: {"size", "sha256"}}) and the new layout."""
    clean, fresh, changed, layout = plan(tensors, previous)
    shards: list[_Shard] = []

    def numbered() -> str:
        layout.next_seq += 1
        return f"adapter_model-{layout.next_seq - 1:05d}.safetensors"

    def written(name: str, pieces: list[_Piece]) -> None:
        write_file(tmp / name, {p.key: p.tensor for p in pieces})
        shards.append(_Shard(name, (tmp / name).stat().st_size, sha256(tmp / name), [p.key for p in pieces]))

    for s in clean:
        name = numbered() if s.file == WEIGHTS_NAME else s.file  # WEIGHTS_NAME is for what changed now
        try:
            os.link(source / s.file, tmp / name)
        except OSError:  # a file system without hard links: a copy, still no serialisation
            shutil.copyfile(source / s.file, tmp / name)
        shards.append(_Shard(name, s.size, s.sha256, s.keys))
    if fresh:
        written(numbered(), fresh)
    written(WEIGHTS_NAME, changed)
    layout.shards = shards
    return {s.file: {"size": s.size, "sha256": s.sha256} for s in shards}, layout


def read(where: Path, names: list[str], fail) -> dict[str, torch.Tensor]:
    """The tensors of the weights files `names` in `where`, row pieces joined; `fail(msg)` makes the error."""
    stored: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            stored.update(load_file(str(where / name), device="cpu"))
        except Exception as exc:  # safetensors raises its own (Rust) error types for bad headers
            raise fail(f"{name} is corrupt (safetensors: {one_line(exc)})") from None
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, t in stored.items():
        name, _, start = key.partition(_ROWS)
        parts.setdefault(name, []).append((int(start) if start.isdigit() else 0, t))
    tensors: dict[str, torch.Tensor] = {}
    for name, ps in parts.items():
        ps.sort(key=lambda p: p[0])
        rows = 0
        for start, t in ps:
            if start != rows:
                raise fail(f"{WEIGHTS_NAME} is corrupt (rows of {name!r} missing or repeated)")
            rows += t.shape[0] if t.dim() else 1
        tensors[name] = ps[0][1] if len(ps) == 1 else torch.cat([t for _, t in ps])
    return tensors


def tensor_name(key: str) -> str:
    """The tensor a stored key holds rows of (`name@rows:<start>` → `name`)."""
    return key.partition(_ROWS)[0]


def check_name(name: str) -> None:
    if _ROWS in name:
        raise ValueError(f"tensor name {name!r} contains {_ROWS!r}, which marks stored row pieces")
