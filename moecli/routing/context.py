"""The per-forward routing state: one `AnchorContext` per bypass, filled before each forward, read by routers.

Why a shared object: transformers calls the wrapped layer with hidden states only, but routing needs what the
*input* was (which entity it names, where each prompt ends, the base model's answer distribution, a learned
question key's features). The bypass's pre-forward hook on the whole model (`adapter.bypass`) computes them
here once per prompt forward (`AnchorContext.compute`), and every router and expert of that forward reads the
same context. Training, teacher-forced scoring and generation all go through `compute`, so an input reaches
the same expert in each. What the caller knows and the tokens do not say (prompt lengths of `prompt + answer`
rows, rows fed from an offset) comes through `moecli.model.feed`, the only other channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moecli.data.probes import blanked
from moecli.model.feed import current_feed
from moecli.routing.anchors import AnchorTrie, prompt_hash


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
    # embedding of the prompt with its entity blanked (`moecli.routing.question.Capture` fills it during the
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
        lengths = current_feed().prompt_lengths
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
