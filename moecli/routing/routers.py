"""Routers: given the target module's input `x` [B,T,d_in] and the anchor context, pick experts.

Every router returns `(gates, idx)`, both [B,T,k]: expert ids (−1 = null route, no expert) and
their gate values. The bypass adds `Σ gates · E_idx(x)`.

- `AnchorGate` (MEMoE): `top_k(softmax(W_g · concat(x_t, anchor) + ε))` per token, noisy in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecli.routing.context import AnchorContext
from moecli.routing.keys import KeyMatcher


def unit_rms(h: torch.Tensor) -> torch.Tensor:
    """`h` scaled to unit root-mean-square over its last dimension (model-independent scale)."""
    return h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)


def null_route_unmatched(
    gates: torch.Tensor, idx: torch.Tensor, ctx: AnchorContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send inputs in which no known anchor was found to no expert at all.

    [choice] An input that names none of the edited entities cannot need an edit, so it keeps
    the base model's output exactly (locality by construction, as GRACE/WISE/SCEN get from their
    thresholds). Off, every input gets an expert, as in the paper.
    """
    if ctx.matched is None:
        return gates, idx
    miss = ~ctx.matched.to(idx.device)
    if miss.any():
        idx = idx.clone()
        gates = gates.clone()
        idx[miss] = -1
        gates[miss] = 0
    return gates, idx


class AnchorGate(nn.Module):
    """MEMoE's knowledge-anchor gate over `concat(x_t, anchor)`, with noisy top-k during training."""

    def __init__(
        self, d_in: int, d_anchor: int, n_experts: int, top_k: int = 1, noisy: bool = True,
        null_unmatched: bool = True, generator: torch.Generator | None = None, noise_bias: float = -3.0,
        null_gate: bool = False,
    ) -> None:
        super().__init__()
        self.top_k, self.noisy, self.null_unmatched = top_k, noisy, null_unmatched
        # [choice] a per-token "act" gate sigmoid(u · R(x_t) + c) multiplying the chosen expert's gate:
        # softmax top-k always picks *some* expert, so without it every token of a matched input is
        # changed; with it the router can learn to leave a token alone (e.g. the subject's tokens,
        # or the last token of another question about the same entity).
        self.null_gate = null_gate
        self.w_act = nn.Parameter(torch.zeros(d_in + d_anchor))
        self.b_act = nn.Parameter(torch.tensor(2.0))
        w = torch.empty(n_experts, d_in + d_anchor)
        w.normal_(0.0, 0.02, generator=generator)
        self.w_gate = nn.Parameter(w)
        self.w_noise = nn.Parameter(torch.zeros(n_experts, d_in + d_anchor))
        # softplus(-3) ≈ 0.05: exploration noise small enough that the expert chosen in training
        # is the one chosen at inference (a unit-scale noise made routing a coin toss).
        self.noise_bias = noise_bias
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: AnchorContext) -> tuple[torch.Tensor, torch.Tensor]:
        anchor = ctx.vectors.to(x.device, torch.float32)
        r = torch.cat([x.float(), anchor.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1)
        logits = r @ self.w_gate.t()
        if self.training and self.noisy:
            logits = logits + torch.randn_like(logits) * F.softplus(r @ self.w_noise.t() + self.noise_bias)
        probs = logits.softmax(-1)
        gates, idx = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        if self.null_gate:
            gates = gates * torch.sigmoid(r @ self.w_act + self.b_act).unsqueeze(-1)
        # Switch-style load balancing: fraction routed to each expert × mean probability.
        n = probs.shape[-1]
        frac = F.one_hot(idx[..., 0], n).float().mean(dim=(0, 1))
        self.aux_loss = n * (frac * probs.mean(dim=(0, 1))).sum()
        if self.null_unmatched:
            gates, idx = null_route_unmatched(gates, idx, ctx)
        return gates, idx


def _per_input(gates: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast one route per input [B,k] to every token [B,T,k] (LEMoE routes whole instances)."""
    t = x.shape[1]
    return gates.unsqueeze(1).expand(-1, t, -1), idx.unsqueeze(1).expand(-1, t, -1)


class KNNRouter(nn.Module):
    """moecli's non-parametric router: the nearest edit key in a FAISS store picks the expert.

    [choice] Deterministic and cheap among thousands of experts; no learned part, so routes of
    earlier batches never drift. Below `threshold` the input gets the null route (no expert).
    """

    def __init__(self, matcher: KeyMatcher) -> None:
        super().__init__()
        self.matcher = matcher

    def forward(self, x: torch.Tensor, ctx: AnchorContext) -> tuple[torch.Tensor, torch.Tensor]:
        _, ids = self.matcher.match(x, ctx)
        idx = ids.unsqueeze(-1)
        return _per_input((idx >= 0).float(), idx, x)


class KVAnchorRouter(nn.Module):
    """LEMoE's KV-anchor router [paper]: `v = W_up SiLU(W_down e)`, `g(i|e) = top_k(softmax_i(k_i · v))`.

    `e` is the instance embedding (the anchor vector); one key per expert, earlier keys frozen when a
    new expert arrives. The same computation runs in training and inference.
    """

    def __init__(self, d_anchor: int, d_hidden: int = 64, d_key: int = 64, top_k: int = 1,
                 null_unmatched: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.top_k, self.null_unmatched = top_k, null_unmatched
        down = torch.empty(d_hidden, d_anchor)
        down.normal_(0.0, d_anchor ** -0.5, generator=generator)
        up = torch.empty(d_key, d_hidden)
        up.normal_(0.0, d_hidden ** -0.5, generator=generator)
        self.w_down, self.w_up = nn.Parameter(down), nn.Parameter(up)
        self.keys = nn.ParameterList()
        self.last_scores: torch.Tensor | None = None

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return F.silu(e.float() @ self.w_down.t()) @ self.w_up.t()

    def add_key(self, init: torch.Tensor) -> None:
        self.keys.append(nn.Parameter(init.detach().float().clone()))

    def forward(self, x: torch.Tensor, ctx: AnchorContext) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.project(ctx.vectors.to(x.device))
        scores = v @ torch.stack(list(self.keys)).t()  # [B, n_experts]
        self.last_scores = scores
        probs = scores.softmax(-1)
        gates, idx = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        gates, idx = _per_input(gates, idx, x)
        if self.null_unmatched:
            gates, idx = null_route_unmatched(gates, idx, ctx)
        return gates, idx


class IndexingNeuronRouter(nn.Module):
    """SCEN's router [paper]: one indexing neuron per expert, scored once at the last prompt token.

    `s_i = sigmoid(w_i · h)` with `h` the target module's input at the prompt's last token; the best
    neuron's expert runs at every position if `s > θ`, otherwise none does. The decision is kept for
    later generation steps. `forced` pins every input to one expert (stage-1 training). With many
    neurons, a FAISS inner-product index finds the best one (sigmoid is monotonic, so the top inner
    product is the top score).
    """

    def __init__(self, d_in: int, threshold: float = 0.65, faiss_above: int = 4096, normalize: bool = True) -> None:
        super().__init__()
        self.threshold, self.faiss_above, self.normalize = threshold, faiss_above, normalize
        self.register_buffer("neurons", torch.zeros(0, d_in))
        self.forced: int | None = None
        # [choice] with a KeyMatcher as scope, the neurons compete only among the edits it accepts for
        # the input (same entity, same question): one neuron per edit cannot otherwise keep apart a
        # thousand edits on a small model.
        self.scope: KeyMatcher | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._index = None

    def add_neuron(self, w: torch.Tensor) -> None:
        self.neurons = torch.cat([self.neurons, w.detach().reshape(1, -1).to(self.neurons)], 0)
        self._index = None

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        """[choice] Scale `h` to unit RMS, so θ and the neuron learning rate mean the same thing on
        every model (FFN activations differ by orders of magnitude between models)."""
        return unit_rms(h.float()) if self.normalize else h.float()

    def best(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best score [B], its expert id [B]) for last-prompt-token inputs `h` [B, d_in]."""
        h = self.prepare(h)
        n = self.neurons.shape[0]
        if n == 0:
            return torch.zeros(h.shape[0], device=h.device), torch.full((h.shape[0],), -1, device=h.device)
        if n > self.faiss_above:
            import faiss

            if self._index is None:
                self._index = faiss.IndexFlatIP(self.neurons.shape[1])
                self._index.add(self.neurons.float().cpu().numpy())
            ip, ids = self._index.search(h.detach().float().cpu().numpy(), 1)
            score = torch.sigmoid(torch.as_tensor(ip[:, 0], device=h.device))
            return score, torch.as_tensor(ids[:, 0], device=h.device)
        scores = torch.sigmoid(h.float() @ self.neurons.float().t())
        return scores.max(-1)

    def scope_candidates(self, x: torch.Tensor, ctx: AnchorContext) -> torch.Tensor:
        """[B, K] expert ids of the edits the key matcher accepts for each input (−1 padding)."""
        self.scope.match(x, ctx)
        return self.scope.candidate_values.to(x.device)

    def best_among(self, h: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best score [B], its expert id [B]) among the `candidates` [B, K] neurons of each input only."""
        h = self.prepare(h)
        if self.neurons.shape[0] == 0:
            return torch.zeros(h.shape[0], device=h.device), torch.full((h.shape[0],), -1, device=h.device)
        candidates = torch.where(candidates < self.neurons.shape[0], candidates, -1)  # an edit whose neuron is
        # still being trained (its own stage 2 probes the model) cannot be chosen yet
        w = self.neurons.float()[candidates.clamp(min=0)]  # [B, K, d]
        scores = torch.sigmoid(torch.einsum("bd,bkd->bk", h.float(), w))
        scores = torch.where(candidates >= 0, scores, torch.full_like(scores, -1.0))
        score, at = scores.max(-1)
        return score, candidates.gather(1, at.unsqueeze(-1)).squeeze(-1)

    def forward(self, x: torch.Tensor, ctx: AnchorContext) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if self.forced is not None:
            idx = torch.full((b, 1), self.forced, device=x.device)
            return _per_input(torch.ones(b, 1, device=x.device), idx, x)
        if ctx.continuation and self._cached is not None and self._cached[0].shape[0] == b:
            gates, idx = self._cached
            return _per_input(gates, idx, x)
        last = ctx.last_index(x.shape[1]).to(x.device)
        h = x[torch.arange(b, device=x.device), last]
        if self.scope is not None:
            score, idx = self.best_among(h, self.scope_candidates(x, ctx))
        else:
            score, idx = self.best(h)
        idx = torch.where(score > self.threshold, idx, torch.full_like(idx, -1))
        gates = (idx >= 0).float()
        self._cached = (gates.unsqueeze(-1), idx.unsqueeze(-1))
        return _per_input(gates.unsqueeze(-1), idx.unsqueeze(-1), x)
