"""The FAISS anchor store: exact lookups, the auto switch to HNSW, and a round trip through the tensors a
checkpoint stores (and through the serialised index older adapters hold)."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from moecli.routing.anchors import AnchorStore


def _keys(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_flat_store_finds_each_stored_key_and_its_value():
    keys = _keys(200)
    store = AnchorStore(32, "flat")
    store.add(keys, np.arange(200) % 7)
    sims, ids = store.search(keys[:50], 1)
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5)
    assert (ids[:, 0] == np.arange(50) % 7).all()


def test_auto_store_switches_to_hnsw_past_the_limit_and_keeps_every_key(monkeypatch):
    monkeypatch.setattr(AnchorStore, "HNSW_ABOVE", 100)
    keys = _keys(300, seed=1)
    store = AnchorStore(32)  # auto
    store.add(keys[:100], np.arange(100))
    assert isinstance(store.index, faiss.IndexFlat)  # not past the limit yet
    store.add(keys[100:], np.arange(100, 300))
    assert hasattr(store.index, "hnsw") and len(store) == 300
    _, ids = store.search(keys, 1)
    assert (ids[:, 0] == np.arange(300)).mean() >= 0.99  # exact duplicates are found by the graph
    saved = {k: v.clone() for k, v in store.tensors("m.").items()}
    again = AnchorStore.from_tensors(saved["m.anchors"], saved["m.anchor_values"])  # the index is rebuilt
    assert hasattr(again.index, "hnsw") and again.index.hnsw.efSearch == AnchorStore.HNSW_EF_SEARCH
    assert (again.search(keys, 1)[1][:, 0] == np.arange(300)).mean() >= 0.99


def test_store_round_trips_through_its_tensors_and_grows_by_new_rows_only():
    keys = _keys(60)
    store = AnchorStore(32, "flat")
    store.add(keys[:40], np.arange(40) // 10)
    before = store.tensors("m.")
    store.add(keys[40:], [4] * 20)
    after = store.tensors("m.")
    # what was stored is untouched, so a checkpoint writes only the new rows (`engine.shards`)
    assert torch.equal(after["m.anchors"][:40], before["m.anchors"]) and len(after["m.anchors"]) == 60
    again = AnchorStore.from_tensors(after["m.anchors"], after["m.anchor_values"], "flat")
    sims, ids = again.search(keys, 1)
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5) and (ids[:, 0] == np.minimum(np.arange(60) // 10, 4)).all()


def test_store_of_an_adapter_saved_as_a_faiss_index_still_loads():
    keys = _keys(30)
    store = AnchorStore(32, "flat")
    store.add(keys, np.arange(30) % 3)
    blob = faiss.serialize_index(store.index).tobytes()
    again = AnchorStore.from_faiss(blob, (np.arange(30) % 3).tolist(), "flat")
    assert torch.equal(again.keys, store.keys) and (again.search(keys, 1)[1][:, 0] == np.arange(30) % 3).all()


def test_empty_store_returns_the_null_route():
    sims, ids = AnchorStore(8).search(_keys(3, 8), 2)
    assert (ids == -1).all() and (sims == -1).all()
