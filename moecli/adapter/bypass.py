"""The MoE bypass: `h = W0 x + λ Σ_{i∈topk} g_i(x) E_i(x)` beside one frozen FFN output module.

The wrapped module (`W0`) is never modified; experts are zero-initialised deltas, so a fresh
bypass is exactly the identity. Experts are `dense` (a full d_out × d_in delta, as the papers) or
`lowrank` (B·A with B = 0 at init, LoRA-style, so thousands of experts stay cheap). The router is
pluggable (`moecli.routing.routers`): it returns, per token, the top-k expert ids (−1 = no expert, the null
route) and their gate values. Anchors reach the router through a shared `AnchorContext` that a
forward pre-hook on the whole model fills from the input ids.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers.cache_utils import Cache

from moecli.model.batching import logits_at
from moecli.model.feed import current_feed
from moecli.model.loading import LayerStandIn
from moecli.routing.context import AnchorContext
from moecli.routing.keys import KeyMatcher

EXPERT_FORMS = ("dense", "lowrank")
SIGNATURES_KEPT = 32


class DenseExpert(nn.Module):
    """A full delta `ΔW x`, zero at init (what MEMoE/LEMoE describe; d_out·d_in parameters)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class LowRankExpert(nn.Module):
    """`B A x` with rank r; B = 0 at init so the delta is zero, A random so gradients flow to B."""

    def __init__(self, d_in: int, d_out: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        a = torch.empty(rank, d_in)
        bound = 1.0 / math.sqrt(d_in)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t()) @ self.B.t()


def make_expert(form: str, d_in: int, d_out: int, rank: int, generator: torch.Generator | None = None) -> nn.Module:
    if form == "dense":
        return DenseExpert(d_in, d_out)
    if form == "lowrank":
        return LowRankExpert(d_in, d_out, rank, generator)
    raise ValueError(f"unknown expert form {form!r} (choose from {', '.join(EXPERT_FORMS)})")


@runtime_checkable
class WrappedLayer(Protocol):
    """What `Injection` puts in a model in place of the frozen target module: `MoEBypass`, GRACE's
    `GraceLayer` and WISE's `WiseLayer`. It is an `nn.Module` (set on the target's parent, so it is found
    among the decoder layer's modules) whose `forward(x)` returns the base module's output for `x`,
    changed or not; these are the members the injection and `bypass_disabled` use."""

    base: nn.Module  # the frozen target module, put back by `Injection.remove`
    context: AnchorContext  # filled by the injection's pre-hook before each prompt forward
    enabled: bool  # false: exactly the base output (the injection's signature pass, `bypass_disabled`)
    matcher: KeyMatcher | None  # feature "output": the injection computes the base answer's signature for it

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BypassOptions:
    """How a bypass's experts are made and where they act, beside its router: what a method settles from its
    config before it builds the bypass in one call."""

    expert_form: str = "lowrank"  # one of EXPERT_FORMS
    rank: int = 16  # of lowrank experts
    scale: float = 1.0  # λ in h = W0 x + λ Σ g_i E_i(x)
    positions: str = "all"  # all | answer: only the last prompt token onwards
    experts: int = 0  # experts made with the bypass (more come from `add_expert`)
    matcher: KeyMatcher | None = None  # the method's key matcher (key substitution, the output signature)
    key_substitution: bool = False  # with a matcher: see `_substitute_keys_impl`
    state_substitution: bool = False  # with a matcher: see `KeyMatcher.substitute_states`
    scope: KeyMatcher | None = None  # inputs it matches to no edit get no expert at all
    # the router sends every input that names no edited entity to no expert: a forward in which no input
    # names one then returns the base output at once
    unmatched_get_nothing: bool = False


class MoEBypass(nn.Module):
    """Wraps the frozen target module; adds the routed sum of expert deltas to its output."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, router: nn.Module, context: AnchorContext,
                 options: BypassOptions | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        options = options or BypassOptions()
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.expert_form, self.rank, self.scale = options.expert_form, options.rank, options.scale
        self.positions = options.positions
        self.experts = nn.ModuleList()
        self.router = router
        self.context = context
        self.enabled = True
        self.scope = options.scope
        self.matcher = options.matcher
        self.key_substitution = options.key_substitution
        self.state_substitution = options.state_substitution
        self.unmatched_get_nothing = options.unmatched_get_nothing
        self.last_routes: torch.Tensor | None = None  # [B, T, k] expert ids of the last forward
        for _ in range(options.experts):
            self.add_expert(generator)

    def add_expert(self, generator: torch.Generator | None = None) -> int:
        """Append a fresh (zero-delta) expert; returns its id."""
        ref = next(self.base.parameters())
        expert = make_expert(self.expert_form, self.d_in, self.d_out, self.rank, generator)
        self.experts.append(expert.to(device=ref.device, dtype=torch.float32))
        return len(self.experts) - 1

    def _substitute_keys(self, x: torch.Tensor) -> torch.Tensor:
        return _substitute_keys_impl(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or len(self.experts) == 0:
            return y
        b = flat_batch(x, self.context)
        if b is not None:
            return self._routed(x.view(b, -1, x.shape[-1]), y.view(b, -1, y.shape[-1])).view(y.shape)
        return self._routed(x, y)

    def _routed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base module's output for `x`, both [B, T, ·]) plus the routed experts' deltas."""
        ctx = self.context
        if self.unmatched_get_nothing and ctx.matched is not None and not bool(ctx.matched.any()):
            self.last_routes = None
            return y
        if self.key_substitution and self.matcher is not None:
            x = self._substitute_keys(x)
        gates, idx = self.router(x, ctx)  # [B,T,k] each
        if self.scope is not None:
            _, hit = self.scope.match(x, ctx)
            keep = (hit >= 0).view(-1, 1, 1)
            gates = gates * keep
            idx = torch.where(keep, idx, torch.full_like(idx, -1))
        if self.positions == "answer" and ctx.prompt_last is not None:
            # [choice] only the last prompt token and later positions (those that produce the answer)
            # are edited; the entity's own tokens keep their representation, so other questions
            # about the same entity are not disturbed through attention. Positions are absolute, so
            # a generation step (offset > 0) or a re-fed sequence (use_cache=False) is edited alike.
            offset = torch.as_tensor(ctx.offset, device=x.device).reshape(-1, 1)  # one per row when training feeds
            pos = offset + torch.arange(x.shape[1], device=x.device)  # each row from its own last prompt token
            keep = pos >= ctx.prompt_last.to(x.device).unsqueeze(1)
            gates = gates * keep.unsqueeze(-1)
            idx = torch.where(keep.unsqueeze(-1), idx, torch.full_like(idx, -1))
        self.last_routes = idx.detach()
        xf = x.float()
        delta = torch.zeros(*x.shape[:-1], self.d_out, device=x.device, dtype=torch.float32)
        for e in torch.unique(idx[idx >= 0]).tolist():
            weight = (gates * (idx == e)).sum(-1)  # [B,T]
            sel = weight != 0
            if sel.any():
                delta[sel] += weight[sel].unsqueeze(-1).float() * self.experts[e](xf[sel])
        return y + (self.scale * delta).to(y.dtype)


def flat_batch(x: torch.Tensor, ctx: AnchorContext) -> int | None:
    """B when a module is fed the tokens of a [B, T, d] batch flattened to [B·T, d] (OPT runs its FFN so),
    so that it can route them as the rows they are; None for an input that keeps its batch axis."""
    if x.dim() == 2 and ctx.vectors is not None and x.shape[0] % ctx.vectors.shape[0] == 0:
        return int(ctx.vectors.shape[0])
    return None


def _substitute_keys_impl(bypass: MoEBypass, x: torch.Tensor) -> torch.Tensor:
    """[choice] At the last prompt token of an input matched to a stored edit, give the router and the
    experts that edit's own input vector: a rephrasing then gets exactly the push the edit prompt was
    trained with (the base module still sees the true input)."""
    ctx = bypass.context
    bypass.matcher.match(x, ctx)
    rows = bypass.matcher.rows
    if rows is None or ctx.prompt_last is None:
        return x
    last = ctx.prompt_last.to(x.device) - torch.as_tensor(ctx.offset, device=x.device)  # in this forward, if at all
    hit = torch.nonzero((rows >= 0) & (last >= 0) & (last < x.shape[1])).flatten()
    if len(hit) == 0:
        return x
    x = x.clone()
    x[hit, last[hit]] = bypass.matcher.raw_queries[rows[hit].cpu()].to(x.device, x.dtype)
    return x


def signature_of(logits: torch.Tensor) -> torch.Tensor:
    """sqrt of softmax(logits) [.., vocab]: the dot product of two signatures is the Bhattacharyya
    coefficient of the two next-token distributions (1 = the model would answer both the same way)."""
    return logits.float().softmax(-1).sqrt()


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@dataclass
class _Generation:
    """One `generate()` call in progress: its first forward is the prompt, every later one a step."""

    attention_mask: torch.Tensor | None
    seen: int | None = None  # tokens of the sequence so far (None until the prompt pass)


def _cached_length(kwargs: dict) -> int:
    """Tokens already in a KV cache passed to a forward, found by type (not by argument name), else 0."""
    for value in kwargs.values():
        if isinstance(value, Cache):
            return int(value.get_seq_length())
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0] \
                and torch.is_tensor(value[0][0]) and value[0][0].dim() == 4:
            return int(value[0][0].shape[-2])  # legacy tuple-of-tuples cache: [B, heads, T, d]
    return 0


class Injection:
    """The bypass placed in a model: the module swap, the anchor pre-hook and a `generate` wrapper, undoable.

    Why the wrapper: the routes of a generated answer are the prompt's, so every forward must be known
    as the prompt or as a later step. How transformers passes the KV cache to `forward` changes between
    releases (5.24 renamed `past_key_values` to `cache` and dropped unpadded attention masks; this
    broke the keyword-based test once), and with `use_cache=False` each step re-feeds the whole
    sequence, which no argument tells apart from a new prompt. Inside our own `generate` wrapper the
    first forward is the prompt and every later one a step, whatever the release, cache or not, beam
    search or sampling. Outside it (a hand-written decoding loop) a forward given a non-empty cache
    object, found by type, is a step.

    Removal puts the original module object back and the model's own `generate`, so the base weights
    are bit-identical (they are never copied or written).
    """

    def __init__(self, model: nn.Module, target_name: str, bypass: WrappedLayer) -> None:
        self.model, self.target_name, self.bypass = model, target_name, bypass
        parent, child = _get_parent(model, target_name)
        setattr(parent, child, bypass)
        self._inner = False
        # the last few signatures computed, newest first: a training loop feeds the same micro-batches at
        # every step (`SIGNATURES_KEPT` covers a batch of a few hundred edits)
        self._sig_cache: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        self._generation: _Generation | None = None
        self._job: tuple | None = None
        self._ids: torch.Tensor | None = None
        self._below = _layers_below(model, bypass)  # (decoder layers, index of the bypass's layer) or None
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._prefix_hook = self._state_hook = None
        if self._below is not None:
            layers, depth = self._below
            self._prefix_hook = layers[depth - 1].register_forward_hook(self._after_prefix)
            if getattr(bypass, "state_substitution", False):
                self._state_hook = layers[depth].register_forward_hook(self._substitute_state)
        self._own_generate = model.__dict__.get("generate")  # an instance attribute we replace, if any
        self._generate = model.generate
        if callable(self._generate):
            model.generate = self.generate

    def generate(self, *args, **kwargs):
        """`model.generate` with the routes of each prompt kept for all of its generated tokens."""
        outer = self._generation
        self._generation = _Generation(kwargs.get("attention_mask"))
        try:
            return self._generate(*args, **kwargs)
        finally:
            self._generation = outer

    def _step_offset(self, input_ids: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> int | None:
        """The absolute position of this forward's first token when it is a later generation step, else None."""
        n = input_ids.shape[1]
        gen = self._generation
        if gen is None:
            cached = _cached_length(kwargs)
            return cached if cached > 0 else None
        if gen.seen is None:  # the prompt pass of this generate call
            gen.seen = n
            return None
        if mask is not None and mask.shape[1] >= n:
            offset = mask.shape[1] - n
        else:
            offset = 0 if n > gen.seen else gen.seen  # a longer input re-feeds the sequence (use_cache=False)
        gen.seen = offset + n
        return offset

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inner:
            return  # the base pass below, run from inside this hook
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = input_ids  # this forward's own tokens (a generation step's too), for `_substitute_state`
        if input_ids is None:
            return
        ctx = self.bypass.context
        mask = kwargs.get("attention_mask")
        suffix = current_feed().whole
        if suffix is not None:  # the later columns of a batch whose earlier ones are cached (training)
            self._prompt_context(suffix[0], suffix[1], {"attention_mask": suffix[1]}, whole=False)
            ctx.offset = suffix[2]
            return
        offset = self._step_offset(input_ids, mask, kwargs)
        if offset is not None:
            ctx.continuation, ctx.offset = True, offset
            return  # a later generation step: keep the prompt's anchors and routes
        gen = self._generation
        if mask is None and gen is not None and gen.attention_mask is not None:
            mask = _rows_like(gen.attention_mask, input_ids)
            if mask is not None:
                kwargs = {**kwargs, "attention_mask": mask}
        self._prompt_context(input_ids, mask, kwargs)

    def _prompt_context(self, input_ids: torch.Tensor, mask: torch.Tensor | None, kwargs: dict,
                        whole: bool = True) -> None:
        """Anchors of a prompt forward, and its signature job. `whole`: the forward feeds all of `input_ids`,
        so the signature pass can share the output of the layers below the bypass (`_after_prefix`)."""
        ctx = self.bypass.context
        ctx.compute(self.model.get_input_embeddings(), input_ids, mask)
        self._job = None
        matcher = self.bypass.matcher  # GRACE's and WISE's layers route by no key matcher
        if self.bypass.enabled and matcher is not None and matcher.feature == "output":
            # Computed once the layers below the bypass have run (`_after_prefix`, sharing them), or, if
            # that hook does not run, when the router first reads it (a whole extra pass).
            job = (input_ids, kwargs, matcher.null_unmatched)
            self._job = job if whole else None
            ctx.pending_signature = lambda: self._signature(*job)

    def _after_prefix(self, module: nn.Module, args: tuple, output) -> None:
        """After the decoder layer below the bypass: the pending signature, from its output."""
        ctx = self.bypass.context
        if self._inner or ctx.pending_signature is None or self._job is None:
            return
        ctx.signature = self._signature(*self._job, prefix_output=output)

    def _substitute_state(self, module: nn.Module, args: tuple, output):
        """After the bypass's decoder layer: `KeyMatcher.substitute_states` on its output."""
        matcher = self.bypass.matcher
        if self._inner or not self.bypass.enabled or matcher is None or not len(matcher.states):
            return None
        h = output[0] if isinstance(output, (tuple, list)) else output
        h = matcher.substitute_states(h, self.bypass.context, self._ids)
        if h is None:
            return None
        return (h, *output[1:]) if isinstance(output, (tuple, list)) else h

    @torch.no_grad()
    def _signature(self, input_ids: torch.Tensor, kwargs: dict, only_matched: bool,
                   prefix_output=None) -> torch.Tensor | None:
        """sqrt of the base model's next-token distribution after each prompt, by one extra forward pass
        with the bypass off, for the rows that name an edited entity (the only ones that can route).

        With `prefix_output` (what the decoder layer below the bypass returned in the pass under way) the
        layers below are not run again: they stand in returning those rows of it, so the extra pass costs
        the layers from the bypass's up and one vocabulary row per prompt. The last few results are kept: a
        training loop feeds the same micro-batches at every step."""
        ctx = self.bypass.context
        rows = torch.nonzero(ctx.matched).flatten() if only_matched else torch.arange(input_ids.shape[0])
        if len(rows) == 0:
            return None
        rows = rows.to(input_ids.device)
        key = (input_ids[rows], ctx.prompt_last[rows].to(input_ids.device))
        kept = next((entry for entry in self._sig_cache if all(a.shape == b.shape and torch.equal(a, b)
                                                                for a, b in zip(entry[0], key))), None)
        if kept is not None:
            part = kept[1]
        else:
            extra = {k: v[rows] for k, v in kwargs.items()
                     if k in ("attention_mask", "position_ids", "token_type_ids") and torch.is_tensor(v)}
            last = key[1].clamp(max=input_ids.shape[1] - 1)
            stand_ins = []
            if prefix_output is not None and self._below is not None:
                layers, depth = self._below
                taken = _take_rows(prefix_output, rows, input_ids.shape[0])
                stand_ins = [(i, layers[i]) for i in range(depth)]
                for i, layer in stand_ins:
                    layers[i] = _StandIn(layer, taken)
            self._inner = True
            try:  # the vocabulary projection at each prompt's last token only
                with bypass_disabled(self.bypass), logits_at(self.model, torch.arange(len(rows), device=last.device),
                                                             last):
                    logits = self.model(input_ids=key[0], use_cache=False, **extra).logits
            finally:
                self._inner = False
                for i, layer in stand_ins:
                    layers[i] = layer
            part = signature_of(logits.reshape(len(rows), -1))
            self._sig_cache = [(key, part), *self._sig_cache[: SIGNATURES_KEPT - 1]]
        out = torch.zeros(input_ids.shape[0], part.shape[-1], device=part.device)
        out[rows.to(part.device)] = part
        return out

    def remove(self) -> nn.Module:
        """Undo the injection; returns the original target module."""
        self._hook.remove()
        for hook in (self._prefix_hook, self._state_hook):
            if hook is not None:
                hook.remove()
        if self.model.__dict__.get("generate") == self.generate:
            if self._own_generate is not None:
                self.model.generate = self._own_generate
            else:
                del self.model.generate
        parent, child = _get_parent(self.model, self.target_name)
        setattr(parent, child, self.bypass.base)
        return self.bypass.base


def _layers_below(model: nn.Module, module: nn.Module) -> tuple[nn.ModuleList, int] | None:
    """(the decoder layers, the index of the one holding `module`) when that index is above 0, else None."""
    from moecli.errors import UserError
    from moecli.model.loading import decoder_layers

    try:
        layers = decoder_layers(model)
    except (UserError, AttributeError):  # not a supported family's layout: no prefix sharing
        return None
    for i, layer in enumerate(layers):
        if any(m is module for m in layer.modules()):
            return (layers, i) if i > 0 else None
    return None


def _take_rows(output, rows: torch.Tensor, batch: int):
    """Rows `rows` of a decoder layer's output (a tensor, or a tuple whose tensors lead with the batch)."""
    if torch.is_tensor(output):
        return output[rows] if output.dim() and output.shape[0] == batch else output
    if isinstance(output, (tuple, list)):
        return type(output)(_take_rows(o, rows, batch) for o in output)
    return output


class _StandIn(LayerStandIn):
    """A decoder layer below the bypass during the signature pass: it returns what it returned in the
    pass under way (the layers below the bypass do not depend on it)."""

    def __init__(self, inner: nn.Module, output) -> None:
        super().__init__(inner)
        object.__setattr__(self, "output", output)

    def forward(self, *args, **kwargs):
        return self.output


def _rows_like(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """generate's own attention mask for a prompt pass that was given none, its rows repeated as generate
    repeats prompts for beams or several returned sequences; None when it cannot be made to fit."""
    mask = mask.to(input_ids.device)
    if mask.shape[1] != input_ids.shape[1] or input_ids.shape[0] % mask.shape[0]:
        return None
    return mask.repeat_interleave(input_ids.shape[0] // mask.shape[0], dim=0)


@contextmanager
def bypass_disabled(bypass: WrappedLayer) -> Iterator[None]:
    """Run the base model's own computation (for baselines and retain targets) inside the block."""
    old = bypass.enabled
    bypass.enabled = False
    try:
        yield
    finally:
        bypass.enabled = old
