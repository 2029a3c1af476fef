"""The key matcher: which stored edit, if any, an input asks about (the same entity *and* the same question).

Routers and the bypass ask it; each edit is a row (its anchor vector in a FAISS store, its question key, its
threshold, the hashes of its own prompt). See `KeyMatcher`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moecli.routing.context import AnchorContext

QUERY_FEATURES = ("input", "output", "learned")


VECTOR_FEATURES = ("input", "learned")  # compared by cosine of stored vectors


def _rest_mass(vals: torch.Tensor) -> torch.Tensor:
    """Probability mass outside the stored top-k sqrt-probabilities `vals` [n, k]; 0 for an edit without
    a signature (its entity was not found in its own prompt), so nothing matches it by question."""
    mass = vals.pow(2).sum(-1)
    return torch.where(mass > 0, (1.0 - mass).clamp(min=0.0), torch.zeros_like(mass))


class KeyMatcher:
    """Matches each input to a stored edit: same entity first, then the same question about it.

    Every edit stores its anchor vector (the entity) in a FAISS inner-product store, and the target
    module's input at its last prompt token (what is asked about the entity). An input matches the
    edit whose anchor is within `anchor_threshold` cosine of its own (the same entity, found among the
    `candidates` nearest anchors) and whose question is nearest to its own, if that question is within
    `query_threshold`. Otherwise it matches nothing: the null route. [choice] The two-stage test is
    what lets "where was X born?" reach X's birthplace edit while "who employs X?" is left alone; with
    `query_threshold = -1` the route is by entity alone, as the papers route.

    The match is decided once per input (its prompt) and kept for later generation steps.
    """

    def __init__(self, d_anchor: int, d_query: int, anchor_threshold: float = 0.95, query_threshold: float = 0.5,
                 null_unmatched: bool = True, index: str = "auto", candidates: int = 16, feature: str = "input",
                 topk: int = 64, encoder=None) -> None:
        from moecli.routing.anchors import AnchorStore

        if feature not in QUERY_FEATURES:
            raise ValueError(f"unknown query feature {feature!r} (choose from {', '.join(QUERY_FEATURES)})")
        self.store = AnchorStore(d_anchor, index)
        self.feature, self.topk = feature, topk
        self.encoder = encoder  # feature "learned": the `moecli.routing.question.QuestionEncoder` of the codes
        d_code = encoder.weight.shape[0] if encoder is not None else d_query
        # unit-norm vectors matched by cosine: last-token inputs ("input") or question codes ("learned")
        self.queries = torch.zeros(0, d_code)
        self.raw_queries = torch.zeros(0, d_query)  # as computed, for key substitution
        self.sig_ids = torch.zeros(0, topk, dtype=torch.long)  # feature "output": top-k token ids ...
        self.sig_vals = torch.zeros(0, topk)  # ... and their sqrt-probabilities under the base model
        self.sig_rest = torch.zeros(0)  # ... and the probability mass outside those top-k tokens
        self.thresholds = torch.zeros(0)  # per stored edit: its own query threshold (≥ query_threshold)
        # feature "output": other questions about an edit's entity that the base model answers the same
        # way (unit-norm inputs [m, d_query], and the row of the edit each belongs to [m])
        self.neg_queries = torch.zeros(0, d_query)
        self.neg_owner = torch.zeros(0, dtype=torch.long)
        # per stored edit: `anchors.prompt_hash` of its prompt as asked and as trained ([n, 2]); an input
        # that is an edit's own prompt matches that edit, whatever the anchor search and the key say
        self.prompt_hashes = torch.zeros(0, 2, dtype=torch.long)
        self._row_of_prompt: dict[int, int] = {}
        # `state_substitution`: what each edit's own prompt and target left after the bypass's decoder layer, edit
        # applied, at the positions that predict the target (the last prompt token, then each target token):
        # an edit's states are a run of rows [m, d_model], with the token each position holds [m] (−1: the
        # prompt's last, whatever it is); per edit its run's first row (−1: none recorded) and length [n]
        self.states = torch.zeros(0, 0)
        self.state_tokens = torch.zeros(0, dtype=torch.long)
        self.state_first = torch.zeros(0, dtype=torch.long)
        self.state_count = torch.zeros(0, dtype=torch.long)
        self.rows: torch.Tensor | None = None  # [B] matched row of the last `match`, −1 for none
        self.candidate_values: torch.Tensor | None = None  # [B, K] values of all edits the last `match` accepted
        self.anchor_threshold, self.query_threshold = anchor_threshold, query_threshold
        self.null_unmatched, self.candidates = null_unmatched, candidates
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cached_rows: torch.Tensor | None = None
        self._cached_candidates: torch.Tensor | None = None
        self._cached_serial = -1  # `AnchorContext.serial` of the forward the cached match belongs to

    def add(self, anchors: torch.Tensor, queries: torch.Tensor, values: list[int],
            thresholds: torch.Tensor | None = None, signatures: torch.Tensor | None = None,
            confusable: list[tuple[int, torch.Tensor]] | None = None, raw: torch.Tensor | None = None,
            prompt_hashes: torch.Tensor | None = None) -> None:
        """Store edits: anchor vectors [n, d_anchor], the vectors matched by cosine [n, ·] (last-token inputs,
        or question codes with feature "learned", whose last-token inputs are then `raw`), expert ids [n],
        optionally each edit's own query threshold (default: `query_threshold`), and with feature
        "output" the base model's signatures after each edit prompt [n, vocab] (kept as top-k), and the
        hashes of the edit prompts [n, 2] (`prompt_hashes`)."""
        if prompt_hashes is None:
            prompt_hashes = torch.zeros(len(values), 2, dtype=torch.long)
        self._add_prompts(prompt_hashes.long().cpu())
        if thresholds is None:
            thresholds = torch.full((len(values),), float(self.query_threshold))
        if self.feature == "output":
            if signatures is None:  # no edit of these named a known entity: no signature was computed
                signatures = torch.zeros(len(values), self.topk)
            vals, ids = signatures.detach().float().cpu().topk(min(self.topk, signatures.shape[-1]), dim=-1)
            pad = self.topk - ids.shape[1]
            self.sig_ids = torch.cat([self.sig_ids, F.pad(ids, (0, pad))])
            self.sig_vals = torch.cat([self.sig_vals, F.pad(vals, (0, pad))])
            self.sig_rest = torch.cat([self.sig_rest, _rest_mass(vals)])
        self.thresholds = torch.cat([self.thresholds, thresholds.detach().float().cpu()])
        if confusable:
            first = len(self.thresholds) - len(values)
            self.neg_owner = torch.cat([self.neg_owner, torch.tensor([first + i for i, _ in confusable])])
            vecs = torch.stack([v.detach().float().cpu() for _, v in confusable])
            self.neg_queries = torch.cat([self.neg_queries, F.normalize(vecs, dim=-1)])
        self.store.add(anchors.detach().float().cpu().numpy(), values)
        self.queries = torch.cat([self.queries, F.normalize(queries.detach().float().cpu(), dim=-1)])
        self.raw_queries = torch.cat([self.raw_queries, (queries if raw is None else raw).detach().float().cpu()])

    def set_states(self, first: int, runs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record the runs (states [c, d_model], tokens [c]) of rows `first` … `first + len(runs) − 1`."""
        n, before = len(self.queries), len(self.states)
        starts = torch.full((n,), -1, dtype=torch.long)
        counts = torch.zeros(n, dtype=torch.long)
        starts[: len(self.state_first)] = self.state_first[:n]
        counts[: len(self.state_count)] = self.state_count[:n]
        lengths = torch.tensor([len(t) for _, t in runs], dtype=torch.long)
        starts[first: first + len(runs)] = before + torch.cumsum(lengths, 0) - lengths
        counts[first: first + len(runs)] = lengths
        new = torch.cat([st.detach().float().cpu() for st, _ in runs])
        # new tensors, as `add` makes: the shards tell a grown table by its identity
        self.states = torch.cat([self.states, new]) if before else new
        self.state_tokens = torch.cat([self.state_tokens, torch.cat([t.long().cpu() for _, t in runs])])
        self.state_first, self.state_count = starts, counts

    def matched_rows(self, ctx: AnchorContext) -> torch.Tensor | None:
        """The rows [B] the match of the forward under way chose (−1: none), or None when no match ran in it."""
        return self.rows if self._cached_serial == ctx.serial else None

    def substitute_states(self, h: torch.Tensor, ctx: AnchorContext, ids: torch.Tensor | None) -> torch.Tensor | None:
        """[choice] `h` [B, T, d] (the output of the bypass's decoder layer, the forward's tokens `ids` [B, T]) with,
        for each input matched to an edit, the state that edit's own prompt and target left at its last prompt
        token and at each later position that holds the edit's target so far; None when nothing is put.

        Why: key substitution gives a rephrasing the expert output its edit was trained with, but the layers
        above read it added to the rephrasing's own residual, and there a third of Gemma 3 270M's reached
        CounterFact rephrasings (SmolLM2: a tenth) answered something else, often another edit's target
        (`state_substitution`); with the whole state each answer position carries what it carried in training,
        while the layers above still read the rephrasing's other tokens."""
        rows = self.matched_rows(ctx)
        if (rows is None or ids is None or ctx.prompt_last is None or h.dim() != 3 or len(rows) != h.shape[0]
                or ids.shape != h.shape[:2]):
            return None
        rows = rows.cpu()
        known = (rows >= 0) & (rows < len(self.state_first))
        if not bool(known.any()):
            return None
        start = (ctx.prompt_last.cpu() - torch.as_tensor(ctx.offset).cpu()).reshape(-1).expand(len(rows)).tolist()
        ids = ids.cpu()
        where, which = [], []
        for b in torch.nonzero(known).flatten().tolist():
            first, count = int(self.state_first[rows[b]]), int(self.state_count[rows[b]])
            for j in range(count if first >= 0 else 0):
                col = start[b] + j
                if 0 <= col < h.shape[1] and (j == 0 or int(ids[b, col]) == int(self.state_tokens[first + j])):
                    where.append((b, col))
                    which.append(first + j)
        if not where:
            return None
        h = h.clone()
        at = torch.tensor(where, device=h.device)
        h[at[:, 0], at[:, 1]] = self.states[torch.tensor(which)].to(h.device, h.dtype)
        return h

    @contextmanager
    def pinned(self, rows_of: dict[int, int]) -> Iterator[None]:
        """Inside the block, inputs whose prompt hash is in `rows_of` reach that row, as an edit's own prompt
        does (training routes an edit's augmented copies so); nothing of it is kept or saved."""
        added = [h for h in rows_of if h not in self._row_of_prompt]
        self._row_of_prompt.update({h: rows_of[h] for h in added})
        try:
            yield
        finally:
            for h in added:
                del self._row_of_prompt[h]

    def _add_prompts(self, hashes: torch.Tensor) -> None:
        first = len(self.prompt_hashes)
        self.prompt_hashes = torch.cat([self.prompt_hashes, hashes])
        for i, row in enumerate(hashes.tolist()):
            for h in row:
                if h:  # 0: not known (an adapter saved before prompts were kept)
                    self._row_of_prompt[h] = first + i  # a later edit of the same prompt supersedes it

    def pair_similarity(self, q_a: torch.Tensor, s_a: torch.Tensor | None, q_b: torch.Tensor,
                        s_b: torch.Tensor | None) -> torch.Tensor:
        """Question similarity of paired inputs a[i], b[i] (the same measure as `similarity`, untruncated)."""
        if self.feature in VECTOR_FEATURES:
            return (F.normalize(q_a.float(), dim=-1) * F.normalize(q_b.float(), dim=-1)).sum(-1).cpu()
        if s_a is None or s_b is None:
            return torch.full((len(q_a),), -1.0)
        return (s_a.float() * s_b.float()).sum(-1).cpu()

    def similarity(self, queries: torch.Tensor, signatures: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """Question similarity of inputs to stored edits: `queries` [B, d_query] last-token inputs,
        `signatures` [B, vocab] (feature "output"), `rows` [B, K] stored rows → [B, K].

        "input": cosine of the target module's inputs at the last prompt token. "output" [choice]: the
        Bhattacharyya coefficient of the base model's next-token distributions: a rephrasing of an
        edited question is one the unedited model answers the same way, another question about the
        same entity is answered differently (it tells the two apart better than the input cosine does;
        docs/design.md has the figures).
        """
        rows = rows.clamp(min=0)
        if self.feature in VECTOR_FEATURES:
            return self._input_cosine(queries, rows)
        if signatures is None:
            return torch.full(rows.shape, -1.0)
        sig = signatures.detach().float().cpu()
        ids, vals = self.sig_ids[rows], self.sig_vals[rows]  # [B, K, topk]
        got = sig.gather(1, ids.reshape(len(sig), -1)).reshape(ids.shape) * (vals > 0)
        # Beyond the stored top-k, Cauchy-Schwarz bounds the rest of the coefficient by
        # sqrt(P_rest · Q_rest); adding that bound makes identical distributions score exactly 1 even
        # when they are flat (an untrained or unsure model), and costs nothing when they are peaked.
        rest = (1.0 - got.pow(2).sum(-1)).clamp(min=0.0)
        return (got * vals).sum(-1) + (rest * self.sig_rest[rows]).sqrt()

    def __len__(self) -> int:
        return len(self.store)

    def match(self, x: torch.Tensor, ctx: AnchorContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(question similarity [B], stored value [B] or −1) of each input's matched edit.

        Decided once per forward (key substitution, the router and the scope all ask; the first asks) and
        kept for later generation steps. Only inputs that name an edited entity are compared when
        unmatched inputs take the null route: the others cost nothing here, whatever the adapter holds.
        """
        b = x.shape[0]
        if self._cached is not None and self._cached[0].shape[0] == b and (
                ctx.continuation or self._cached_serial == ctx.serial):
            self.rows = self._cached_rows  # the prompt's match holds for all of its generated tokens
            self.candidate_values = self._cached_candidates
            return self._cached
        sims = torch.full((b,), -1.0)
        values = torch.full((b,), -1, dtype=torch.long)
        rows = torch.full((b,), -1, dtype=torch.long)
        candidates = torch.full((b, 1), -1, dtype=torch.long)
        active = torch.arange(b)
        if self.null_unmatched and ctx.matched is not None:
            active = torch.nonzero(ctx.matched.cpu()).flatten()
        if len(self.store) and len(active):
            k = min(self.candidates, len(self))
            last = ctx.last_index(x.shape[1]).to(x.device)[active.to(x.device)]
            q = x[active.to(x.device), last]
            if self.feature == "learned":  # the question code of the layer the encoder reads (captured below)
                hidden = ctx.question_hidden
                q = (self.encoder.encode(hidden[active.to(hidden.device)]) if hidden is not None
                     else torch.zeros(len(active), self.queries.shape[1], device=x.device))
            a_sims, pos = self.store.index.search(
                self.store._normalise(ctx.vectors[active.to(ctx.vectors.device)].detach().float().cpu().numpy()), k
            )
            a_sims, pos = torch.as_tensor(a_sims), torch.as_tensor(pos)
            ok = (a_sims >= self.anchor_threshold) & (pos >= 0)
            signature = ctx.signature
            q_sims = self.similarity(q, None if signature is None else signature[active.to(signature.device)], pos)
            ok &= q_sims >= self.thresholds[pos.clamp(min=0)]
            if len(self.neg_owner):
                ok &= self._nearer_than_confusable(q, pos)
            q_sims = torch.where(ok, q_sims, torch.full_like(q_sims, -2.0))
            best, at = q_sims.max(-1)
            chosen = pos[torch.arange(len(active)), at]
            hit = ok.any(-1)
            sims[active] = torch.where(hit, best, sims[active])
            values[active] = torch.where(hit, torch.as_tensor(self.store.values)[chosen.clamp(min=0)], values[active])
            rows[active] = torch.where(hit, chosen, rows[active])
            cand = torch.as_tensor(self.store.values)[pos.clamp(min=0)]
            candidates = torch.full((b, k), -1, dtype=torch.long)
            candidates[active] = torch.where(ok & hit.unsqueeze(-1), cand, torch.full_like(cand, -1))
        if self._row_of_prompt and len(ctx.prompt_hashes) == b:
            for i in active.tolist():
                row = self._row_of_prompt.get(ctx.prompt_hashes[i])
                # its own prompt scores 1 against the edit's threshold, as every match is tested (a reverted
                # edit's threshold is above any similarity)
                if row is not None and self.thresholds[row] <= 1.0:
                    value = int(self.store.values[row])
                    sims[i], values[i], rows[i] = 1.0, value, row
                    candidates[i] = torch.tensor([value] + [-1] * (candidates.shape[1] - 1))
        self.rows = rows.to(x.device)
        self.candidate_values = candidates.to(x.device)  # [B, K] values of every edit that matched, −1 padding
        self._cached = (sims.to(x.device), values.to(x.device))
        self._cached_rows, self._cached_candidates, self._cached_serial = self.rows, self.candidate_values, ctx.serial
        return self._cached

    def _input_cosine(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Cosine of last-token inputs `queries` [B, d_query] with the stored edits' at `rows` [B, K] → [B, K]."""
        return torch.einsum("bd,bkd->bk", F.normalize(queries.detach().float().cpu(), dim=-1), self.queries[rows])

    def _nearer_than_confusable(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, K]: is each input nearer (target-module input cosine) to candidate edit `pos` than to every
        question the base model answers like that edit's? A 1-nearest-neighbour test between the two."""
        own = self._input_cosine(q, pos.clamp(min=0))
        mine = torch.isin(self.neg_owner, pos[pos >= 0])  # only the forms of these candidates matter
        if not bool(mine.any()):
            return torch.ones_like(own, dtype=torch.bool)
        negs, owners = self.neg_queries[mine], self.neg_owner[mine]
        to_neg = F.normalize(q.detach().float().cpu(), dim=-1) @ negs.t()  # [B, m]
        owned = owners.view(1, 1, -1) == pos.unsqueeze(-1)  # [B, K, m]
        rival = torch.where(owned, to_neg.unsqueeze(1), torch.full_like(owned, -2.0, dtype=torch.float32))
        # ties go to the edit (a form whose input equals the edit's cannot be told apart; the edit's own
        # prompt must still reach it), up to float rounding of the unit vectors
        return own >= rival.max(-1).values - 1e-4

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        # The live tensors, not copies: `add` replaces them (torch.cat) rather than growing them in place, so a
        # checkpoint's shards can tell an unchanged table by its identity and skip comparing it row by row.
        tensors = {**self.store.tensors("matcher."), "matcher.queries": self.queries,
                   "matcher.raw_queries": self.raw_queries, "matcher.thresholds": self.thresholds,
                   "matcher.neg_queries": self.neg_queries, "matcher.neg_owner": self.neg_owner,
                   "matcher.prompt_hashes": self.prompt_hashes}
        if len(self.states):
            tensors.update({"matcher.states": self.states, "matcher.state_tokens": self.state_tokens,
                            "matcher.state_first": self.state_first, "matcher.state_count": self.state_count})
        if self.feature == "output":
            tensors.update({"matcher.sig_ids": self.sig_ids, "matcher.sig_vals": self.sig_vals})
        return tensors, {}

    def load(self, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:

        from moecli.errors import UserError
        from moecli.routing.anchors import AnchorStore

        store = AnchorStore.from_checkpoint(tensors, files, "matcher.", self.store.kind)
        if store is None:
            raise UserError("adapter: missing the anchor store (matcher.anchors)")
        self.store = store
        if "matcher.queries" not in tensors:
            raise UserError("adapter: missing the key matcher's questions (matcher.queries)")
        self.queries = tensors["matcher.queries"].float().cpu()
        self.raw_queries = tensors.get("matcher.raw_queries", self.queries).float().cpu()
        default = torch.full((len(self.queries),), float(self.query_threshold))
        self.thresholds = tensors.get("matcher.thresholds", default).float().cpu()
        self.neg_queries = tensors.get("matcher.neg_queries", torch.zeros(0, self.queries.shape[1])).float().cpu()
        self.neg_owner = tensors.get("matcher.neg_owner", torch.zeros(0, dtype=torch.long)).long().cpu()
        self.prompt_hashes, self._row_of_prompt = torch.zeros(0, 2, dtype=torch.long), {}
        self._add_prompts(tensors.get("matcher.prompt_hashes",
                                      torch.zeros(len(self.queries), 2, dtype=torch.long)).long().cpu())
        self.states = tensors.get("matcher.states", torch.zeros(0, 0)).float().cpu()
        self.state_tokens = tensors.get("matcher.state_tokens", torch.zeros(0, dtype=torch.long)).long().cpu()
        self.state_first = tensors.get("matcher.state_first", torch.zeros(0, dtype=torch.long)).long().cpu()
        self.state_count = tensors.get("matcher.state_count", torch.zeros(0, dtype=torch.long)).long().cpu()
        if self.feature == "output":
            if "matcher.sig_ids" not in tensors:
                raise UserError("adapter: missing the edits' output signatures (matcher.sig_ids)")
            self.sig_ids = tensors["matcher.sig_ids"].long().cpu()
            self.sig_vals = tensors["matcher.sig_vals"].float().cpu()
            self.sig_rest = _rest_mass(self.sig_vals)
            self.topk = self.sig_ids.shape[1]
