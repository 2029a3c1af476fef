"""Knowledge anchors: which span of an input names the entity, and its anchor vector.

MEMoE and LEMoE route by the input's named entity ("knowledge anchor"); a record's `subject` is that
entity at training time, but at inference there is no subject field. moecli therefore keeps a token
trie of every subject an adapter was trained on and finds anchors in any input by matching token
sequences (leftmost, then longest), falling back to the whole input. Training, evaluation and
generation all call the same `AnchorContext.compute`, so an input reaches the same expert in each.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch


def prompt_hash(ids: list[int]) -> int:
    """A stable signed 64-bit hash of a token sequence (the same in every process and Python version)."""
    digest = hashlib.blake2b(b"".join(int(t).to_bytes(8, "little", signed=True) for t in ids), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def continues_name(decode: Callable[[list[int]], str], ids: list[int], end: int) -> bool:
    """Whether the text after token `end - 1` goes on with the same name: a word piece ("Paris|ian") or a
    capitalised word or a number (" P12", " General Assembly").

    [choice] A subject followed by more of a name is another entity ("Motormaster Part"); real prompts
    rarely do this (docs/design.md has the count), so the rule costs almost nothing.
    """
    if end >= len(ids):
        return False
    last = decode(ids[end - 1 : end])
    both = decode(ids[end - 1 : end + 1])
    rest = both[len(last):] if both.startswith(last) else ""
    if not rest:
        return False
    if rest[0].isalnum():
        return True
    return rest[0] == " " and len(rest) > 1 and (rest[1].isupper() or rest[1].isdigit())


class AnchorTrie:
    """A token trie of known anchors: each subject's token variants map to one canonical sequence.

    A subject tokenizes differently at the start of a text and after a space ("Alice" vs " Alice"
    for byte-level BPE); both variants are matched, and both give the anchor vector of the same
    canonical sequence (the leading-space form), so "Alice Moreau was born in" and "Where was Alice
    Moreau born?" have the same anchor.

    Each edit prompt is also kept whole (`exact`: its hash → the span of its own subject in it and that
    subject's canonical index), so the prompt an edit was trained on is anchored exactly as it was then,
    whatever subjects are added later ("leftmost" could otherwise pick a later edit's subject named before
    it) and even when the record's subject is not written in its prompt ("Who is Obama married to?" for
    "Barack Obama").
    """

    def __init__(self) -> None:
        self.root: dict = {}
        self.sequences: list[list[int]] = []  # every matchable variant
        self._canon_index: list[int] = []  # per variant, its canonical's index
        self.canonical: list[list[int]] = []  # one per subject
        self._canon_of: dict[tuple[int, ...], int] = {}
        self._variants_of: dict[int, list[list[int]]] = {}  # canonical index → its variants
        self._known: set[tuple[int, ...]] = set()  # `sequences`, for a constant-time membership test
        self.exact: dict[int, tuple[int, int, int]] = {}  # prompt hash → (start, end or -1 for none, canonical)
        # the items as `to_bytes` writes them, kept so that a save encodes only what is new
        self._canonical_text: list[str] = []
        self._variant_text: list[str] = []
        self._exact_text: dict[int, str] = {}

    def add(self, ids: list[int], canon: list[int] | None = None) -> None:
        """Register a token sequence whose anchor is `canon` (default: itself)."""
        ids = [int(t) for t in ids]
        canon = [int(t) for t in (canon or ids)]
        if not ids:
            return
        key = tuple(canon)
        if key not in self._canon_of:
            self._canon_of[key] = len(self.canonical)
            self.canonical.append(canon)
        if tuple(ids) in self._known:
            return
        self._known.add(tuple(ids))
        self._variants_of.setdefault(self._canon_of[key], []).append(ids)
        node = self.root
        for t in ids:
            node = node.setdefault(t, {})
        node[-1] = self._canon_of[key]
        self.sequences.append(ids)
        self._canon_index.append(node[-1])

    def add_subject(self, tokenizer, subject: str) -> None:
        """Register a subject as it tokenizes at the start of a text and after a space, and with its first
        letter in the other case ("The Eiffel Tower" is "the Eiffel Tower" inside a sentence)."""
        canon = tokenizer(" " + subject, add_special_tokens=False)["input_ids"]
        texts = [subject, " " + subject]
        if subject[:1].isalpha() and subject[:1].swapcase() != subject[:1]:
            # only after a space: without one, "tizen" (from "Tizen") would match inside " citizenship"
            texts.append(" " + subject[:1].swapcase() + subject[1:])
        for text in texts:
            self.add(tokenizer(text, add_special_tokens=False)["input_ids"], canon)

    def add_exact(self, ids: list[int], subject_ids: list[int]) -> None:
        """Anchor the prompt `ids` (as `AnchorContext.compute` sees it: no BOS, no padding) on the subject
        registered with the canonical sequence `subject_ids`: at the leftmost of that subject's variants in
        it, else (the subject is not written in the prompt) on the whole prompt with the subject's vector."""
        canon = self._canon_of[tuple(int(t) for t in subject_ids)]
        own = AnchorTrie()
        for seq in self._variants_of.get(canon, []):
            own.add(seq)
        hit = own.find(ids)  # the record names its subject so: no `continues_name` test
        self._set_exact(prompt_hash(ids), (hit[0], hit[1], canon) if hit is not None else (0, -1, canon))

    def _set_exact(self, h: int, value: tuple[int, int, int]) -> None:
        self.exact[h] = value
        self._exact_text[h] = json.dumps([h, *value])

    def find(self, ids: list[int], decode: Callable[[list[int]], str] | None = None) -> tuple[int, int, int] | None:
        """The leftmost, then longest, known anchor span `(start, end, canonical index)`, or None.

        Leftmost: in `prompt + answer`, the subject precedes the answer, so an answer that happens
        to be another edit's subject never steals the route. With `decode` (the tokenizer's), a span
        the text goes on naming (`continues_name`: "Nissan Primera| P12", "Paris|ian") is not that
        anchor: the input names a longer entity that merely contains a known one.
        """
        for start in range(len(ids)):
            node, hit = self.root, None
            for pos in range(start, len(ids)):
                node = node.get(ids[pos])
                if node is None:
                    break
                if -1 in node and not (decode and continues_name(decode, ids, pos + 1)):
                    hit = (start, pos + 1, node[-1])
            if hit is not None:
                return hit
        return None

    def to_bytes(self) -> bytes:
        """The trie as `from_json` reads it: canonical sequences, variants with their canonical's index, exact
        prompts. The canonical and variant lists only grow, so the text of their items is kept
        and a save encodes only the new ones (an exact prompt's text is made when it is set): a stream saves after
        every batch, and encoding the whole trie took 0.04-0.14 s per save at 10,000 edits."""
        canonical, variants = self._canonical_text, self._variant_text
        canonical += [json.dumps(c) for c in self.canonical[len(canonical):]]
        variants += [json.dumps([v, c]) for v, c in zip(self.sequences[len(variants):],
                                                        self._canon_index[len(variants):])]
        return (f'{{"canonical": [{", ".join(canonical)}], "variants": [{", ".join(variants)}], '
                f'"exact": [{", ".join(self._exact_text.values())}]}}').encode()

    @classmethod
    def from_json(cls, data: dict) -> AnchorTrie:
        trie = cls()
        for seq, canon_idx in data.get("variants", []):
            trie.add(seq, data["canonical"][canon_idx])
        for h, a, b, c in data.get("exact", []):
            trie._set_exact(int(h), (int(a), int(b), int(c)))
        return trie

    def __len__(self) -> int:
        return len(self.sequences)


class AnchorStore:
    """Anchor keys in a FAISS inner-product index: key = normalised anchor vector, value = expert id.

    Routing among thousands of experts costs one index search, and the route is deterministic. `kind`
    is `flat` (exact), `hnsw` (approximate graph search) or `auto` (the default): flat up to
    `HNSW_ABOVE` keys, then rebuilt once as HNSW. [choice] Below that flat search is exact and already
    fast; above it HNSW is several times faster at the same recall@1 (figures: docs/design.md).
    """

    HNSW_ABOVE = 10_000
    HNSW_M, HNSW_EF_SEARCH = 32, 64

    def __init__(self, dim: int, kind: str = "auto") -> None:
        if kind not in ("flat", "hnsw", "auto"):
            raise ValueError(f"unknown anchor index kind {kind!r} (flat, hnsw, auto)")
        self.dim, self.kind = dim, kind
        self.index = self._hnsw(dim) if kind == "hnsw" else self._flat(dim)
        # The keys are also held as tensors, which is what a checkpoint stores: as grown tables, only the new
        # rows are written at each save (`engine.shards`), where the serialised index was rewritten whole
        # (23 MB per save at 10,000 SmolLM2 edits). The index is rebuilt from them at load.
        self.keys = torch.zeros(0, dim)
        self.values = torch.zeros(0, dtype=torch.long)

    @staticmethod
    def _flat(dim: int):
        import faiss

        return faiss.IndexFlatIP(dim)

    @classmethod
    def _hnsw(cls, dim: int):
        import faiss

        index = faiss.IndexHNSWFlat(dim, cls.HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cls.HNSW_EF_SEARCH
        return index

    def _maybe_switch(self) -> None:
        """`auto`: past HNSW_ABOVE keys, move every stored key into an HNSW index (once)."""
        import faiss

        if self.kind == "auto" and len(self) > self.HNSW_ABOVE and isinstance(self.index, faiss.IndexFlat):
            self.index = self._hnsw(self.dim)
            self.index.add(self.keys.numpy())

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @staticmethod
    def _normalise(x):
        import numpy as np

        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def add(self, keys, values) -> None:
        """Add keys [n, dim] (any scale; normalised here) routing to expert ids `values` [n]."""
        keys = self._normalise(keys)
        self.index.add(keys)
        self.keys = torch.cat([self.keys, torch.from_numpy(keys)])  # a new tensor: see `KeyMatcher.state`
        self.values = torch.cat([self.values, torch.as_tensor(values, dtype=torch.long).reshape(-1)])
        self._maybe_switch()

    def search(self, queries, k: int = 1):
        """(cosine similarities [B,k], expert ids [B,k]); id −1 where the store is empty."""
        import numpy as np

        q = self._normalise(queries)
        if len(self) == 0:
            return np.full((len(q), k), -1.0, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        sims, pos = self.index.search(q, k)
        ids = np.where(pos >= 0, self.values.numpy()[np.clip(pos, 0, None)], -1)
        return sims, ids

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the normalised keys and their expert ids (the live tables, not copies)."""
        return {f"{prefix}anchors": self.keys, f"{prefix}anchor_values": self.values}

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor, kind: str = "auto") -> AnchorStore:
        """The store `tensors` saved, its index rebuilt (the keys are stored normalised: added as they are)."""
        store = cls(keys.shape[1], kind)
        store.keys = keys.float().contiguous()
        store.values = values.long().reshape(-1)
        store.index.add(store.keys.numpy())
        store._maybe_switch()
        return store

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], files: dict[str, bytes], prefix: str,
                        kind: str = "auto") -> AnchorStore | None:
        """The store a checkpoint holds: its `tensors` (under `prefix`), else the serialised FAISS index of an
        adapter saved before the keys were tensors; None when it holds neither."""
        if f"{prefix}anchors" in tensors and f"{prefix}anchor_values" in tensors:
            return cls.from_tensors(tensors[f"{prefix}anchors"], tensors[f"{prefix}anchor_values"], kind)
        if "anchors.faiss" in files:
            return cls.from_faiss(files["anchors.faiss"], json.loads(files.get("anchor_values.json", b"[]")), kind)
        return None

    @classmethod
    def from_faiss(cls, data: bytes, values, kind: str = "auto") -> AnchorStore:
        """The store of an adapter saved when the keys were stored as a serialised FAISS index."""
        import faiss
        import numpy as np

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls.from_tensors(torch.from_numpy(index.reconstruct_n(0, index.ntotal)).reshape(-1, index.d),
                                torch.as_tensor(np.asarray(values, dtype=np.int64)), kind)
