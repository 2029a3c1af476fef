"""The FAISS anchor store: exact lookups, the auto switch to HNSW, and a round trip through bytes."""

from __future__ import annotations

import faiss
import numpy as np

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
    again = AnchorStore.from_bytes(store.to_bytes(), store.values)
    assert (again.search(keys, 1)[1] == ids).all()
    assert again.index.hnsw.efSearch == AnchorStore.HNSW_EF_SEARCH


def test_empty_store_returns_the_null_route():
    sims, ids = AnchorStore(8).search(_keys(3, 8), 2)
    assert (ids == -1).all() and (sims == -1).all()
