"""Order planning for lifelong editing: which edits share a batch, and in which order batches come.

LEMoE (Wang & Li, EMNLP 2024) found that the *order* of a stream of edit batches changes lifelong
editing results by up to 20 points, and fixed it with clustering-based order planning: k-means over
the edits' embeddings, batches drawn from one cluster, so that similarity is high inside a batch and
low between batches. This module is that planner; the CLI (`moecli plan-order`, `moecli lifelong
--order planned`) only wires it up.

Why each piece looks like it does:

- **Embeddings** (`embed_records`). The default `anchor` embedder is exactly the routing anchor of
  LEMoE: the mean of the base model's frozen input embeddings over the record's subject tokens, found
  with the same `moecli.routing.anchors.AnchorTrie` the router uses. Planning with the vector the router
  sees means "similar" in the plan is "similar" to the router, and it needs no extra dependency. The
  optional `minilm` embedder (all-MiniLM-L6-v2 from the `embed` extra) embeds the whole prompt with
  a sentence encoder: meaningful even when the base model is tiny or untrained.
- **Clustering**: FAISS spherical k-means (cosine), `k = ceil(N / batch_size)` so that clusters are
  batch-sized on average. Run with one OpenMP thread and a fixed seed: the plan must be a pure
  function of (records, batch size, seed, embedder, model).
- **Batches of exactly `batch_size`** (`_form_batches`): clusters are never the right size, so
  they are split and merged by greedy "k-member" peeling (Byun et al., 2007): take the member least
  like the rest (the periphery, which would otherwise end up as the dregs of a poor batch), then
  grow its batch one member at a time by the candidate most similar to the batch so far. Large
  clusters are peeled into full batches first; what is left of every cluster (all of a small one)
  goes to a pool that is peeled the same way, so a small cluster merges with its nearest leftovers.
  Only the pool's final remainder, `N mod batch_size` records, forms a shorter batch, placed last.
- **Batch order** (`_order_batches`): a greedy chain that starts from the most central batch and
  always continues with the batch least similar to the current one. Low similarity between
  consecutive batches is what LEMoE asks for: each batch trains a new expert and key while earlier
  ones freeze, so a batch unlike the previous one shares no anchors with the expert just frozen
  (its route cannot be captured by it, nor disturbed by the router update). Starting from the most
  central batch puts the batch with the most similar neighbours at an end of the path, where it has
  only one neighbour. Both choices are deterministic (ties go to the lowest index).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moecli.data.readers import write_jsonl
from moecli.data.records import EditRecord
from moecli.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only; transformers is imported lazily
    from moecli.model.loading import LoadedModel

EMBEDDERS = ("anchor", "minilm")

# k-means iterations (FAISS's default): on ZsRE-1000 / batch 10 the plan is the same with 10, 20 or 50.
KMEANS_ITERATIONS = 20
# When a batch grows, only this many nearest neighbours of its seed (times the batch size) are
# candidates: the members of a coherent batch are near its seed anyway, and it bounds the cost.
CANDIDATES_PER_SLOT = 4
# Records per embedding-table lookup (anchor).
EMBED_CHUNK = 256


@dataclass
class Plan:
    """A planned order of edit batches.

    `batches`: the records of each batch, in the planned order (every batch has exactly the batch
    size except possibly the last). `batch_of`: for the flattened planned order (`records()`), the
    batch index of each record. `stats`: see `plan_batches`.
    """

    batches: list[list[EditRecord]]
    batch_of: list[int]
    stats: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[EditRecord]:
        """The records in planned order (the batches concatenated)."""
        return [r for batch in self.batches for r in batch]


# --------------------------------------------------------------------------------------------
# Embeddings


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, d], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _anchor_token_ids(records: Sequence[EditRecord], tokenizer) -> list[list[int]]:
    """For each record, the token ids its routing anchor is pooled over.

    Exactly what `AnchorContext.compute` selects for the prompt when the trie holds only this
    record's own subject: the prompt is tokenized as `record_anchor_vectors` does, BOS/pad are
    skipped (as `BypassMethod` configures its context), the leftmost-longest match of the subject
    (with or without a leading space) is the span, and without a subject or a match the whole
    prompt is. A trie per record (rather than one of all subjects) makes the vector a property of
    the record alone, independent of which other edits happen to be in the file.
    """
    from moecli.routing.anchors import AnchorTrie

    skip = {t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None}
    encoded = tokenizer([r.prompt for r in records])["input_ids"]
    out: list[list[int]] = []
    for rec, ids in zip(records, encoded):
        seq = [int(t) for t in ids if t not in skip]
        hit = None
        if rec.subject:
            trie = AnchorTrie()
            trie.add_subject(tokenizer, rec.subject)
            hit = trie.find(seq)
        span = trie.canonical[hit[2]] if hit is not None else seq
        out.append(span or [int(t) for t in ids])  # a prompt of special tokens only: keep them
    return out


def _anchor_embeddings(records: Sequence[EditRecord], loaded: LoadedModel) -> np.ndarray:
    """Mean frozen input embedding over each record's anchor tokens (batched lookups)."""
    import torch

    embedding = loaded.model.get_input_embeddings()
    device = embedding.weight.device
    spans = _anchor_token_ids(records, loaded.tokenizer)
    rows: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(spans), EMBED_CHUNK):
            chunk = spans[start : start + EMBED_CHUNK]
            flat = torch.tensor([t for span in chunk for t in span], dtype=torch.long, device=device)
            owner = torch.tensor([i for i, span in enumerate(chunk) for _ in span], device=device)
            vectors = embedding(flat).float()
            sums = torch.zeros((len(chunk), vectors.shape[-1]), dtype=torch.float32, device=device)
            sums.index_add_(0, owner, vectors)
            counts = torch.tensor([len(span) for span in chunk], dtype=torch.float32, device=device)
            rows.append((sums / counts.unsqueeze(1)).cpu().numpy())
    return np.concatenate(rows, axis=0)


def embed_records(
    records: Sequence[EditRecord], loaded: LoadedModel | None = None, embedder: str = "anchor"
) -> np.ndarray:
    """Embeddings [N, d] (float32, every row L2-normalised) of the edits, for planning.

    `anchor` (default): the routing anchor of each record, i.e. the mean of `loaded`'s frozen input
    embeddings over its subject's tokens in the prompt (the whole prompt when there is no subject or
    it is not found as tokens); see `_anchor_token_ids`. Needs `loaded`.
    `minilm`: all-MiniLM-L6-v2 sentence embedding of the prompt (the `embed` extra), on `loaded`'s
    device when given, else CPU. A sentence encoder sees the whole question (relation and subject)
    and is meaningful whatever the base model, e.g. a tiny one.
    """
    if embedder not in EMBEDDERS:
        raise UserError(f"--embedder {embedder}: expected one of {', '.join(EMBEDDERS)}")
    if not records:
        return np.zeros((0, 0), dtype=np.float32)
    if embedder == "anchor":
        if loaded is None:
            raise UserError("--embedder anchor needs the base model (--model)")
        return _normalise(_anchor_embeddings(records, loaded))
    device = loaded.device if loaded is not None else "cpu"
    from moecli.routing.sentence import embed_texts

    return _normalise(embed_texts([r.prompt for r in records], device).numpy())


# --------------------------------------------------------------------------------------------
# Similarity statistics


def similarity_stats(emb: np.ndarray, batches_idx: Sequence[Sequence[int]]) -> dict[str, float]:
    """How similar edits are inside batches and across consecutive batches (cosine).

    `emb` [N, d] is normalised here (so any scale works); `batches_idx` lists each batch's row
    indices in order. Definitions:

    - `within`: for each batch with at least 2 members, the mean cosine over its distinct pairs
      (i < j); then the mean over those batches (each batch counts once, whatever its size).
    - `between_consecutive`: for each t, the mean cosine over all pairs (i in batch t, j in batch
      t+1); then the mean over t. This equals the dot product of the two batches' mean vectors.

    NaN when undefined (no batch of 2 or more; fewer than 2 batches).
    """
    x = _normalise(emb)
    sums = [x[list(b)].sum(0) if len(b) else np.zeros(x.shape[1], np.float32) for b in batches_idx]
    within = []
    for b, s in zip(batches_idx, sums):
        n = len(b)
        if n >= 2:
            # sum over ordered pairs i != j of x_i.x_j = |sum|^2 - sum |x_i|^2 (= n for unit rows)
            within.append((float(s @ s) - float((x[list(b)] ** 2).sum())) / (n * (n - 1)))
    between = [
        float(sums[t] @ sums[t + 1]) / (len(batches_idx[t]) * len(batches_idx[t + 1]))
        for t in range(len(batches_idx) - 1)
        if len(batches_idx[t]) and len(batches_idx[t + 1])
    ]
    return {
        "within": float(np.mean(within)) if within else math.nan,
        "between_consecutive": float(np.mean(between)) if between else math.nan,
    }


def chunk_indices(n: int, batch_size: int) -> list[list[int]]:
    """Rows 0..n-1 in consecutive batches of `batch_size` (the last may be shorter)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------------
# Planning


@contextlib.contextmanager
def _faiss_single_thread() -> Iterator[None]:
    """One OpenMP thread inside FAISS while clustering, so the result never depends on scheduling."""
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster label of each row of `x` (unit rows) by FAISS spherical k-means."""
    import faiss

    if k <= 1:
        return np.zeros(len(x), dtype=np.int64)
    with _faiss_single_thread():
        # min_points_per_centroid=1: k ~ N / batch_size is by design far below FAISS's 39 points
        # per centroid, and its warning would go to stderr (the engine never prints).
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=KMEANS_ITERATIONS,
            seed=seed,
            spherical=True,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=max(256, len(x)),
        )
        km.train(x)
        _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def _peel(x: np.ndarray, members: np.ndarray, batch_size: int, n_batches: int) -> tuple[list[list[int]], np.ndarray]:
    """Peel `n_batches` full batches off `members` (row indices of unit rows `x`); return the rest.

    Each batch starts from the remaining member least similar to the remaining members' mean (the
    most peripheral one) and grows by the candidate most similar to the batch's sum so far (average
    linkage), the candidates being the seed's `CANDIDATES_PER_SLOT * batch_size` nearest remaining
    members. Ties go to the lowest position, so the result is deterministic.
    """
    remaining = np.asarray(members, dtype=np.int64)
    batches: list[list[int]] = []
    total = x[remaining].sum(0) if len(remaining) else None
    for _ in range(n_batches):
        if len(remaining) < batch_size:
            break
        xr = x[remaining]
        seed_pos = int(np.argmin(xr @ total))
        to_seed = xr @ xr[seed_pos]
        to_seed[seed_pos] = np.inf  # the seed first, even if a duplicate also has cosine 1
        n_cand = min(len(remaining), CANDIDATES_PER_SLOT * batch_size)
        cand = np.argsort(-to_seed, kind="stable")[:n_cand]
        xc = xr[cand]
        chosen = [0]
        free = np.ones(n_cand, dtype=bool)
        free[0] = False
        score = xc @ xc[0]
        while len(chosen) < batch_size:
            pick = int(np.argmax(np.where(free, score, -np.inf)))
            chosen.append(pick)
            free[pick] = False
            score = score + xc @ xc[pick]
        positions = cand[chosen]
        batches.append([int(i) for i in remaining[positions]])
        total = total - xr[positions].sum(0)
        keep = np.ones(len(remaining), dtype=bool)
        keep[positions] = False
        remaining = remaining[keep]
    return batches, remaining


def _form_batches(x: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Full batches (each exactly `batch_size` row indices) and the short remainder (maybe empty).

    Every cluster (in label order) gives `len // batch_size` full batches by peeling; the leftovers
    of all clusters form a pool (in row order) peeled the same way; the pool's last
    `N mod batch_size` rows are the remainder.
    """
    batches: list[list[int]] = []
    pool: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        full, rest = _peel(x, members, batch_size, len(members) // batch_size)
        batches.extend(full)
        pool.append(rest)
    leftovers = np.sort(np.concatenate(pool)) if pool else np.zeros(0, dtype=np.int64)
    full, rest = _peel(x, leftovers, batch_size, len(leftovers) // batch_size)
    batches.extend(full)
    return batches, [int(i) for i in rest]


def _order_batches(x: np.ndarray, batches: list[list[int]]) -> list[int]:
    """Order of the full batches: greedy chain, least similar batch next (see the module docstring).

    Similarity of two batches is the mean cosine over their cross pairs, i.e. the dot product of
    their mean vectors, the quantity `similarity_stats` reports between consecutive batches.
    Starts from the batch most similar to the global mean. O(B^2 d) for B batches.
    """
    if not batches:
        return []
    means = np.stack([x[b].mean(0) for b in batches])
    start = int(np.argmax(means @ x.mean(0)))
    order = [start]
    free = np.ones(len(batches), dtype=bool)
    free[start] = False
    for _ in range(len(batches) - 1):
        sims = means @ means[order[-1]]
        nxt = int(np.argmin(np.where(free, sims, np.inf)))
        order.append(nxt)
        free[nxt] = False
    return order


def plan_batches(
    records: Sequence[EditRecord],
    batch_size: int,
    loaded: LoadedModel | None = None,
    seed: int = 0,
    embedder: str = "anchor",
    embeddings: np.ndarray | None = None,
) -> Plan:
    """Plan the batches of a lifelong edit stream (LEMoE's clustering-based order planning).

    1. Embed the records (`embed_records`, or the given `embeddings` [N, d], e.g. precomputed).
    2. FAISS spherical k-means with k = ceil(N / batch_size) and this `seed`.
    3. Split and merge clusters into batches of exactly `batch_size` (`_form_batches`); only the
       last batch may be shorter (N mod batch_size records).
    4. Order the full batches by a greedy least-similar-next chain (`_order_batches`); the short
       batch goes last.

    `stats`: `planned`, `file` (the input order cut into consecutive batches) and `random` (a
    permutation drawn from `seed`), each `similarity_stats` of its batches; plus `n_clusters`,
    `n_batches`, `batch_size`, `seed`, `embedder` ("given" when `embeddings` were passed).
    Deterministic: the same records, batch size, seed and embeddings give the same plan.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer (got {batch_size!r})")
    records = list(records)
    if not records:
        raise UserError("no records to plan")
    if embeddings is None:
        x = embed_records(records, loaded, embedder)
        used = embedder
    else:
        x = _normalise(embeddings)
        if len(x) != len(records):
            raise ValueError(f"embeddings has {len(x)} rows for {len(records)} records")
        used = "given"
    n = len(records)
    k = max(1, math.ceil(n / batch_size))
    labels = _kmeans_labels(x, k, seed)
    full, rest = _form_batches(x, labels, batch_size)
    order_idx = [full[i] for i in _order_batches(x, full)]
    if rest:
        order_idx.append(rest)
    assert sorted(i for b in order_idx for i in b) == list(range(n)), "planner lost or duplicated a record"

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    random_idx = [[int(perm[i]) for i in chunk] for chunk in chunk_indices(n, batch_size)]
    stats = {
        "planned": similarity_stats(x, order_idx),
        "file": similarity_stats(x, chunk_indices(n, batch_size)),
        "random": similarity_stats(x, random_idx),
        "n_clusters": int(len(np.unique(labels))),
        "n_batches": len(order_idx),
        "batch_size": batch_size,
        "seed": seed,
        "embedder": used,
    }
    batches = [[records[i] for i in b] for b in order_idx]
    batch_of = [t for t, b in enumerate(order_idx) for _ in b]
    return Plan(batches=batches, batch_of=batch_of, stats=stats)


# --------------------------------------------------------------------------------------------
# Files


class _WithBatch:
    """A record as `write_jsonl` sees it (anything with `to_dict`), plus its batch index."""

    __slots__ = ("record", "batch")

    def __init__(self, record: EditRecord, batch: int) -> None:
        self.record, self.batch = record, batch

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "batch": self.batch}


def write_plan(plan: Plan, path: str | Path) -> None:
    """Write the planned records as moecli JSONL (atomically), each line with an extra `"batch"`.

    The moecli JSONL reader ignores fields it does not know, so `read_records` reads the file as
    ordinary records in planned order.
    """
    write_jsonl((_WithBatch(r, t) for t, batch in enumerate(plan.batches) for r in batch), path)
