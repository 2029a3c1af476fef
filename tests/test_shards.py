"""Incremental checkpoint writes (`moecli.engine.shards`): a save writes what changed, and a load
always gives back exactly the tensors saved, whatever changed in place, grew, or was replaced."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moecli.engine import shards
from moecli.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from moecli.errors import UserError


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(path, Checkpoint(config={"m": 1}, tensors=tensors))


def _keys(path: Path, name: str) -> set[str]:
    with safe_open(str(path / name), "pt") as f:
        return set(f.keys())


def _weights(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if shards.is_shard_name(n))


def _assert_loads(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    got = load_checkpoint(path).tensors
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(got[k], t), k


def test_unchanged_tensors_are_linked_and_only_new_rows_written(tmp_path: Path) -> None:
    path = tmp_path / "a"
    frozen = torch.randn(256, 8)  # much larger than what the second save adds: no merge
    table = torch.randn(10, 4)
    _save(path, {"expert.0": frozen, "table": table})
    first_inode = os.stat(path / shards.WEIGHTS_NAME).st_ino

    grown = torch.cat([table, torch.randn(5, 4)])  # a new tensor object whose first rows are the old ones
    new = torch.randn(16, 8)
    _save(path, {"expert.0": frozen, "expert.1": new, "table": grown})

    assert _keys(path, shards.WEIGHTS_NAME) == set()  # nothing changed
    inodes = {n: os.stat(path / n).st_ino for n in _weights(path) if n != shards.WEIGHTS_NAME}
    assert first_inode in inodes.values()  # the first save's file, linked under a shard name
    new_files = [n for n, ino in inodes.items() if ino != first_inode]
    assert len(new_files) == 1 and _keys(path, new_files[0]) == {"expert.1", "table@rows:10"}  # only what is new
    _assert_loads(path, {"expert.0": frozen, "expert.1": new, "table": grown})


def test_changes_in_place_and_replacements_are_written(tmp_path: Path) -> None:
    path = tmp_path / "a"
    big = torch.randn(256, 16)  # large enough that the small saves below do not merge it away
    trained = torch.zeros(4, 4)
    _save(path, {"big": big, "trained": trained})
    _save(path, {"big": big, "trained": trained, "x": torch.ones(1)})
    with torch.no_grad():
        trained.add_(1.0)  # an optimiser step: same tensor, same address, new contents
    view = big[:2]
    view.mul_(2.0)  # through a view
    _save(path, {"big": big, "trained": trained, "x": torch.full((1,), 3.0)})
    _assert_loads(path, {"big": big, "trained": trained, "x": torch.full((1,), 3.0)})
    assert load_checkpoint(path).tensors["trained"].sum() == 16.0


def test_a_shrunk_or_reshaped_tensor_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "a"
    _save(path, {"t": torch.arange(12.0).view(6, 2)})
    _save(path, {"t": torch.arange(12.0).view(6, 2)[:4].clone()})
    _assert_loads(path, {"t": torch.arange(8.0).view(4, 2)})
    _save(path, {"t": torch.arange(8.0).view(2, 4)})
    _assert_loads(path, {"t": torch.arange(8.0).view(2, 4)})


def test_many_saves_keep_few_shards_and_exact_contents(tmp_path: Path) -> None:
    """A lifelong stream in miniature: an expert per save, a growing table, a tensor trained each time."""
    path = tmp_path / "a"
    rng = random.Random(0)
    state: dict[str, torch.Tensor] = {"router": torch.randn(3, 3), "scalar": torch.tensor(2.0)}
    table = torch.zeros(0, 6)
    seen: set[int] = set()
    written = 0  # bytes of the weights files each save created (linked files are not new inodes)
    for step in range(60):
        state[f"expert.{step}"] = torch.randn(rng.randint(50, 150), 6)
        table = torch.cat([table, torch.randn(2, 6)])
        state["table"] = table
        with torch.no_grad():
            state["router"].add_(0.1)
        if step % 17 == 16:  # now and then an old expert is retrained
            with torch.no_grad():
                state[f"expert.{step // 2}"].mul_(-1)
        _save(path, state)
        assert len(_weights(path)) <= 12
        # the grown table's rows are joined when shards merge: at most one piece per shard, not one per save
        table_pieces = sum(shards.tensor_name(k) == "table" for n in _weights(path) for k in _keys(path, n))
        assert table_pieces <= len(_weights(path))
        for n in _weights(path):
            st = os.stat(path / n)
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                written += st.st_size
    _assert_loads(path, state)
    total = sum(os.stat(path / n).st_size for n in _weights(path))
    assert written < 6 * total  # whole-adapter writes would be about 30x (60 saves of a growing adapter)


def test_a_checkpoint_replaced_by_someone_else_is_written_whole(tmp_path: Path) -> None:
    path, other = tmp_path / "a", tmp_path / "b"
    a = {"t": torch.randn(8, 2)}
    _save(path, a)
    _save(other, {"t": torch.randn(8, 2), "u": torch.randn(3)})
    shutil.rmtree(path)
    shutil.copytree(other, path)  # e.g. restored from a copy: what this process remembers is void
    _save(path, {**a, "v": torch.ones(2)})
    assert _weights(path) == [shards.WEIGHTS_NAME]
    _assert_loads(path, {**a, "v": torch.ones(2)})


def test_missing_rows_are_reported_as_damage(tmp_path: Path) -> None:
    path = tmp_path / "a"
    table = torch.randn(256, 4)
    _save(path, {"table": table})
    _save(path, {"table": torch.cat([table, torch.randn(3, 4)])})
    old = [n for n in _weights(path) if n != shards.WEIGHTS_NAME][0]
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["contents"][old]  # the older shard dropped from the file list
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"rows of 'table' missing"):
        load_checkpoint(path)


def test_reserved_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row pieces"):
        _save(tmp_path / "a", {"x@rows:3": torch.ones(1)})
    with pytest.raises(ValueError, match="bad checkpoint file name"):
        shard_name = "adapter_model-00001.safetensors"
        save_checkpoint(tmp_path / "b", Checkpoint(config={}, tensors={}, files={shard_name: b""}))
