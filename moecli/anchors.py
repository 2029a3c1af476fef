"""Knowledge anchors: which span of an input names the entity, and its anchor vector.

MEMoE and LEMoE route by the input's named entity ("knowledge anchor"); a record's `subject` is that
entity at training time, but at inference there is no subject field. moecli therefore keeps a token
trie of every subject an adapter was trained on and finds anchors in any input by matching token
sequences (leftmost, then longest), falling back to the whole input. Training, evaluation and
generation all call the same `AnchorContext.compute`, so an input reaches the same expert in each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

PROMPT_LENGTHS: ContextVar[list[int] | None] = ContextVar("moecli_prompt_lengths", default=None)
"""Set by code that feeds `prompt + answer` at once (training, teacher-forced scoring): how many
tokens of each row are the prompt. Routers that decide from the last prompt token (SCEN) read it;
when unset, the whole (unpadded) input of the first forward is the prompt, as in generation."""

SUFFIX_OF: ContextVar[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = ContextVar("moecli_suffix_of",
                                                                                          default=None)
"""Set by the training loop when a forward feeds each row of a batch from column `offsets[row]` on, its
earlier columns sitting in a KV cache (`training.PromptCache`): (the whole batch's input ids, its
attention mask, offsets [B]). The anchors, routes and signature are those of the whole input."""


def prompt_hash(ids: list[int]) -> int:
    """A stable signed 64-bit hash of a token sequence (the same in every process and Python version)."""
    digest = hashlib.blake2b(b"".join(int(t).to_bytes(8, "little", signed=True) for t in ids), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def continues_name(decode: Callable[[list[int]], str], ids: list[int], end: int) -> bool:
    """Whether the text after token `end - 1` goes on with the same name: a word piece ("Paris|ian") or a
    capitalised word or a number (" P12", " General Assembly").

    [choice] Measured on SmolLM2's tokenizer: of 9967 prompts and rephrasings that contain their own
    subject (`counterfact_train` 0–2999, `counterfact_edit` 0–999, ZsRE 2000–2999) 3 go on naming after
    it (ZsRE: "Motormaster Part").
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
        self.canonical: list[list[int]] = []  # one per subject
        self._canon_of: dict[tuple[int, ...], int] = {}
        self._variants_of: dict[int, list[list[int]]] = {}  # canonical index → its variants
        self._known: set[tuple[int, ...]] = set()  # `sequences`, for a constant-time membership test
        self.exact: dict[int, tuple[int, int, int]] = {}  # prompt hash → (start, end or -1 for none, canonical)

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
        self.exact[prompt_hash(ids)] = (hit[0], hit[1], canon) if hit is not None else (0, -1, canon)

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

    def to_json(self) -> dict:
        return {"canonical": self.canonical,
                "variants": [[seq, self._find_exact(seq)] for seq in self.sequences],
                "exact": [[h, *v] for h, v in self.exact.items()]}

    def _find_exact(self, seq: list[int]) -> int:
        node = self.root
        for t in seq:
            node = node[t]
        return node[-1]

    @classmethod
    def from_json(cls, data: dict) -> AnchorTrie:
        trie = cls()
        for seq, canon_idx in data.get("variants", []):
            trie.add(seq, data["canonical"][canon_idx])
        trie.exact = {int(h): (int(a), int(b), int(c)) for h, a, b, c in data.get("exact", [])}
        return trie

    def __len__(self) -> int:
        return len(self.sequences)


def mean_embedding(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `embeds` [B,T,d] over positions where `mask` [B,T] is set."""
    m = mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class AnchorContext:
    """Per-forward routing context, filled by a pre-hook on the model and read by the bypass.

    `vectors` [B, d_embed]: anchor vector of each input; `matched` [B]: whether a known anchor was
    found (False means the fallback, whole-input mean, was used); `spans`: the spans found.
    During `generate`, later steps (with a non-empty KV cache) keep the prompt's context.
    """

    trie: AnchorTrie = field(default_factory=AnchorTrie)
    vectors: torch.Tensor | None = None
    matched: torch.Tensor | None = None
    spans: list[tuple[int, int] | None] = field(default_factory=list)
    skip_token_ids: set[int] = field(default_factory=set)
    decode: Callable[[list[int]], str] | None = None  # the tokenizer's: see `continues_name`
    prompt_last: torch.Tensor | None = None  # [B] position of each row's last prompt token
    continuation: bool = False  # a later generation step (KV cache filled): keep earlier routes
    # absolute position of this forward's first token: 0 for a prompt, the tokens already seen for a
    # later generation step (0 again when generate re-feeds the whole sequence, use_cache=False); a
    # tensor [B], one per row, when training feeds each row from its own last prompt token
    offset: int | torch.Tensor = 0
    serial: int = 0  # counts `compute` calls: what a router decided for this forward can be kept by it
    # `signature` (a property below): [B, vocab] sqrt of the *base* model's next-token distribution
    # after each prompt, when a matcher keyed on the model's output asks for it (see `KeyMatcher`);
    # None otherwise. It may be left pending, computed when first read.
    _signature: torch.Tensor | None = None
    pending_signature: Callable[[], torch.Tensor | None] | None = None
    # `question_hidden` (a property below): [B, ·] the features of a learned question key, the outputs of
    # some decoder layers at each row's last prompt token and, for an encoder that reads text, the sentence
    # embedding of the prompt with its entity blanked (`moecli.question.Capture` fills it during the
    # forward, below the bypass; the text part is computed when first read)
    _question_hidden: torch.Tensor | None = None
    pending_question: Callable[[], torch.Tensor | None] | None = None
    attention: torch.Tensor | None = None  # [B, T] the prompt forward's attention mask (WISE averages over it)
    input_ids: torch.Tensor | None = None  # [B, T] the prompt forward's tokens (for `skeletons`)
    prompt_hashes: list[int] = field(default_factory=list)  # [B] `prompt_hash` of each row's prompt tokens

    @property
    def signature(self) -> torch.Tensor | None:
        if self.pending_signature is not None:
            compute, self.pending_signature = self.pending_signature, None
            self._signature = compute()
        return self._signature

    @signature.setter
    def signature(self, value: torch.Tensor | None) -> None:
        self.pending_signature = None
        self._signature = value

    @property
    def question_hidden(self) -> torch.Tensor | None:
        if self.pending_question is not None:
            compute, self.pending_question = self.pending_question, None
            self._question_hidden = compute()
        return self._question_hidden

    @question_hidden.setter
    def question_hidden(self, value: torch.Tensor | None) -> None:
        self.pending_question = None
        self._question_hidden = value

    def skeletons(self) -> list[str]:
        """Each row's prompt as text with the entity found in it blanked (`locality.blanked`: what a question
        asks, whoever it asks about), the whole prompt where none was found; decoded from the tokens."""
        from moecli.locality import blanked

        out = []
        for ids, keep, last, span in zip(self.input_ids.tolist(), self.attention.tolist(), self.prompt_last.tolist(),
                                         self.spans):

            def text(lo: int, hi: int, ids=ids, keep=keep) -> str:
                return self.decode([t for t, a in zip(ids[lo:hi], keep[lo:hi]) if a and t not in self.skip_token_ids])

            out.append(text(0, last + 1) if span is None else blanked(text(0, span[0]), text(span[1], last + 1)))
        return out

    def last_index(self, width: int) -> torch.Tensor:
        """[B] column of each row's last prompt token in this forward's input (its first token is at
        absolute position `offset`), clamped into the `width` columns it has."""
        offset = torch.as_tensor(self.offset, device=self.prompt_last.device)
        return (self.prompt_last - offset).clamp(min=0, max=width - 1)

    @torch.no_grad()
    def compute(self, embedding: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Find anchor spans in each row and mean-pool the frozen input embeddings over them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = input_ids.tolist()
        masks = attention_mask.tolist()
        lengths = PROMPT_LENGTHS.get()
        if lengths is None or len(lengths) != len(rows):
            lengths = None
        span_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        matched, spans, canon, hashes = [], [], {}, []
        for b, (ids, am) in enumerate(zip(rows, masks)):
            # the prompt only: generation routes on the prompt, so teacher-forced `prompt + answer` must
            # too (an answer naming an edited subject, "... is a citizen of| Japan", would take its edit)
            width = lengths[b] if lengths is not None else len(ids)
            valid = [i for i, (t, a) in enumerate(zip(ids[:width], am)) if a and t not in self.skip_token_ids]
            seq = [ids[i] for i in valid]
            hashes.append(prompt_hash(seq))
            hit = self.trie.exact.get(hashes[-1]) if self.trie.exact else None
            if hit is not None and hit[1] < 0:  # an edit prompt that does not write its subject
                canon[b] = self.trie.canonical[hit[2]]
                matched.append(True)
                spans.append(None)
                continue
            if hit is None:
                hit = self.trie.find(seq, self.decode) if len(self.trie) else None
            if hit is None:
                for i in valid:
                    span_mask[b, i] = True
                matched.append(False)
                spans.append(None)
            else:
                pos = valid[hit[0] : hit[1]]
                canon[b] = self.trie.canonical[hit[2]]
                matched.append(True)
                spans.append((pos[0], pos[-1] + 1))
        if lengths is not None:
            last = [n - 1 for n in lengths]
        else:
            last = [max((i for i, a in enumerate(am) if a), default=0) for am in masks]
        self.prompt_last = torch.tensor(last, device=input_ids.device)
        self.continuation = False
        self.offset = 0
        self.serial += 1
        self.signature = None
        self.question_hidden = None
        self.attention = attention_mask
        self.input_ids = input_ids
        embeds = embedding(input_ids)
        vectors = mean_embedding(embeds.float(), span_mask)
        for b, ids in canon.items():
            vectors[b] = embedding(torch.tensor(ids, device=input_ids.device)).float().mean(0)
        self.vectors = vectors.to(embeds.dtype)
        self.matched = torch.tensor(matched, device=input_ids.device)
        self.spans = spans
        self.prompt_hashes = hashes


def record_anchor_vectors(embedding: torch.nn.Module, tokenizer, texts: list[str], ctx: AnchorContext) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """Anchor vectors (and matched flags) of raw texts, computed exactly as during a forward pass."""
    device = embedding.weight.device
    enc = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.zeros((len(enc), width), dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    ctx.compute(embedding, ids.to(device), mask.to(device))
    return ctx.vectors, ctx.matched


class AnchorStore:
    """Anchor keys in a FAISS inner-product index: key = normalised anchor vector, value = expert id.

    Routing among thousands of experts costs one index search, and the route is deterministic. `kind`
    is `flat` (exact), `hnsw` (approximate graph search) or `auto` (the default): flat up to
    `HNSW_ABOVE` keys, then rebuilt once as HNSW. [choice] Measured here (1 thread, 64 queries, 100,000
    keys of width 128): flat 6.5 ms/query, HNSW with efSearch 64 0.8 ms/query at recall@1 1.00 (a
    one-time build of ~1 min); below 10,000 keys flat is exact and already fast (< 0.2 ms/query).
    """

    HNSW_ABOVE = 10_000
    HNSW_M, HNSW_EF_SEARCH = 32, 64

    def __init__(self, dim: int, kind: str = "auto") -> None:
        if kind not in ("flat", "hnsw", "auto"):
            raise ValueError(f"unknown anchor index kind {kind!r} (flat, hnsw, auto)")
        self.dim, self.kind = dim, kind
        self.index = self._hnsw(dim) if kind == "hnsw" else self._flat(dim)
        import numpy as np

        self.values = np.zeros(0, dtype=np.int64)

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
            keys = self.index.reconstruct_n(0, len(self))
            self.index = self._hnsw(self.dim)
            self.index.add(keys)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @staticmethod
    def _normalise(x):
        import numpy as np

        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def add(self, keys, values) -> None:
        """Add keys [n, dim] (any scale; normalised here) routing to expert ids `values` [n]."""
        import numpy as np

        self.index.add(self._normalise(keys))
        self.values = np.concatenate([self.values, np.asarray(values, dtype=np.int64)])
        self._maybe_switch()

    def search(self, queries, k: int = 1):
        """(cosine similarities [B,k], expert ids [B,k]); id −1 where the store is empty."""
        import numpy as np

        q = self._normalise(queries)
        if len(self) == 0:
            return np.full((len(q), k), -1.0, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        sims, pos = self.index.search(q, k)
        ids = np.where(pos >= 0, self.values[np.clip(pos, 0, None)], -1)
        return sims, ids

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, values, kind: str = "auto") -> AnchorStore:
        import faiss
        import numpy as np

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        store = cls(index.d, kind)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = cls.HNSW_EF_SEARCH
        store.index = index
        store.values = np.asarray(values, dtype=np.int64)
        return store
