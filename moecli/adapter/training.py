"""The one edit-training loop every method uses.

Masked cross-entropy on the target tokens only (prompt tokens labelled −100), AdamW, an early stop
once every target token of the batch is the argmax, and a max-steps bound. Optionally a *retain*
term: KL divergence to the unedited model's next-token distributions on given prompts, so that the
bypass learns where not to act. Methods differ only in which parameters they hand to this loop
and which extra loss they add: per micro-batch (`extra_loss`, e.g. a router's load-balancing term) or
once per step (`step_loss`, e.g. WISE's activation margins, computed from stored inputs).
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moecli.model.batching import Batch, answer_logits, collate, encode_pair, forward, logits_at, pad_id_of, prompt_only
from moecli.model.feed import current_feed, feeding
from moecli.model.loading import LayerStandIn

Progress = Callable[[str, int, int], None]


@dataclass
class TrainConfig:
    """Hyper-parameters of the edit-training loop."""

    lr: float = 1e-3
    max_steps: int = 100
    weight_decay: float = 0.0
    early_stop: bool = True
    stop_prob: float = 0.0  # early stop also needs every target token at ≥ this probability (0: argmax is enough)
    micro_batch: int = 128  # rows per forward: larger forwards amortise the per-call cost on CPU
    retain_weight: float = 1.0
    optimizer: str = "adamw"
    prefix_cache: bool = True  # run what training cannot change once per batch (FrozenPrefix, PromptCache)
    eos_target: bool = False  # train each target followed by the token that ends it (`batching.answer_end_id`)
    # 0: every step is one optimiser step over all pairs (full batch). N > 0: every step is an epoch over
    # mini-batches of N pairs in a seeded random order, one optimiser step each (LocFT-BF's breadth-first)
    mini_batch: int = 0
    loss_stop: float = 0.0  # > 0: a mini-batch under this loss takes no step; an epoch under it ends training
    seed: int = 0  # the mini-batches' composition and order


@dataclass
class TrainStats:
    steps: int
    loss: float
    all_correct: bool
    seconds: float


@dataclass
class RetainSet:
    """Prompts whose next-token distributions must stay as the unedited model's (`log_probs`)."""

    batch: Batch
    log_probs: torch.Tensor  # [N, T, V] base log-probabilities at every prompt position

    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls, model, tokenizer, prompts: Sequence[str], base_forward: Callable, continuation: int = 3
    ) -> RetainSet:
        """Encode prompts, extend each by the base model's own greedy continuation, and record the
        base model's distributions at every position (`base_forward` runs it unedited).

        The continuation matters: an answer of several tokens is predicted at positions *after*
        the prompt, and those must stay unchanged too.
        """
        device = model.get_input_embeddings().weight.device
        pad = pad_id_of(tokenizer)
        items = [prompt_only(tokenizer, p) for p in prompts]
        for _ in range(continuation):
            logits = base_forward(collate(items, pad).to(device))
            for row, it in enumerate(items):
                it.ids.append(int(logits[row, len(it.ids) - 1].argmax()))
        batch = collate(items, pad).to(device)
        return cls(batch, base_forward(batch).float().log_softmax(-1))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":  # WISE [EasyEdit]
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_on_pairs(
    model, tokenizer, params: list[torch.nn.Parameter], pairs: Sequence[tuple[str, str]], cfg: TrainConfig, *,
    extra_loss: Callable[[], torch.Tensor | None] | None = None, retain: RetainSet | None = None,
    train_modules: Sequence[torch.nn.Module] = (), progress: Progress | None = None, stage: str = "training",
    unedited: Callable[[], AbstractContextManager] | None = None,
    step_loss: Callable[[], torch.Tensor | None] | None = None,
) -> TrainStats:
    """Train `params` so that `model` answers each (prompt, target) pair; everything else frozen.

    The base model stays in eval mode (no dropout: the frozen network must behave as at
    inference); only `train_modules` (e.g. a noisy router) are put in training mode. An early stop
    is confirmed by an eval-mode pass, so "all targets right" holds for the model as it will be used.
    Unless `cfg.prefix_cache` is off, nothing training cannot change is computed twice: the decoder
    layers below the trainable ones run once per batch (`FrozenPrefix`), and when the trained modules
    leave every position before each prompt's last token alone (a method says so by giving `unedited`,
    a context in which the model runs as the unedited one) so do those positions (`PromptCache`). The
    vocabulary projection runs only at answer positions. Pairs are grouped by length into micro-batches
    (less padding; the loss is a sum over pairs, so the grouping does not change it). With `cfg.eos_target`
    each target is followed by its end token (end of turn after a chat prompt, else end of sequence, as
    LocFT-BF appends `tok.eos_token`), which counts like any target token, early stop included: the edited
    prompt answers and stops.
    """
    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)
    encoded = [encode_pair(tokenizer, p, a, end=cfg.eos_target) for p, a in pairs]
    rng = torch.Generator().manual_seed(cfg.seed)
    if cfg.mini_batch > 0:  # fixed mini-batches (the prefix and prompt caches stay valid), visited in a new order
        perm = torch.randperm(len(encoded), generator=rng).tolist()
        groups = [[encoded[i] for i in perm[k : k + cfg.mini_batch]] for k in range(0, len(perm), cfg.mini_batch)]
    else:
        groups = [encoded]
    batches, members = [], []  # micro-batches of similar length, and the micro-batches of each group
    for group in groups:
        group = sorted(group, key=lambda e: (e.answer_start, len(e.ids)))
        members.append([(len(batches) + n, len(group)) for n in range(-(-len(group) // cfg.micro_batch))])
        batches += [collate(group[i : i + cfg.micro_batch], pad).to(device)
                    for i in range(0, len(group), cfg.micro_batch)]
    opt = make_optimizer(params, cfg)
    modes = [m.training for m in train_modules]
    same_in_eval = not any(_mode_dependent(m) for m in train_modules)
    for m in train_modules:
        m.train()
    loss_value, all_correct, step, first_correct = float("nan"), False, 0, 0
    prefix = FrozenPrefix(model, params if cfg.prefix_cache else [])
    prompts = PromptCache(model, unedited if cfg.prefix_cache else None)

    def gradients(group: list[tuple[int, int]]) -> tuple[bool, bool, float]:
        """Backward of one group's loss (its micro-batches, plus the per-step terms); (all argmax, all at
        least at `cfg.stop_prob` too, loss)."""
        correct, confident, total_loss = True, True, 0.0
        for j, rows in group:
            batch = batches[j]
            with prefix.batch(j):
                logits, answers = prompts.answer_logits(j, batch)
            loss = F.cross_entropy(logits.float(), answers) * (len(batch.input_ids) / rows)
            extra = extra_loss() if extra_loss else None
            if extra is not None:
                loss = loss + extra
            hit, sure = _hits(logits.detach(), answers, cfg.stop_prob)
            correct, confident = correct and hit, confident and sure
            if loss.requires_grad:  # no trainable part on the path (nothing routed): nothing to learn here
                loss.backward()
            total_loss += float(loss.detach())
            del logits
        extra_step = step_loss() if step_loss else None  # once per step, not per micro-batch (WISE)
        if extra_step is not None and extra_step.requires_grad:
            extra_step.backward()
            total_loss += float(extra_step.detach())
        if retain is not None and cfg.retain_weight > 0:
            with prefix.batch("retain"):
                rl = retain_loss(model, retain) * cfg.retain_weight
            if rl.requires_grad:
                rl.backward()
            total_loss += float(rl.detach())
        return correct, confident, total_loss

    try:
        with prefix:
            for step in range(1, cfg.max_steps + 1):
                if cfg.mini_batch > 0:  # an epoch: one optimiser step per mini-batch
                    losses = []
                    for g in torch.randperm(len(members), generator=rng).tolist():
                        opt.zero_grad(set_to_none=True)
                        losses.append(gradients(members[g])[2])
                        if losses[-1] >= cfg.loss_stop:
                            opt.step()
                    loss_value = sum(losses) / len(losses)
                    if progress:
                        progress(stage, step, cfg.max_steps)
                    done = loss_value < cfg.loss_stop
                    if done or cfg.early_stop:
                        all_correct, sure = _all_correct_eval(batches, train_modules, prefix, prompts, cfg.stop_prob)
                        if done or (all_correct and sure):
                            break
                    continue
                opt.zero_grad(set_to_none=True)
                correct, confident, loss_value = gradients(members[0])
                if progress:
                    progress(stage, step, cfg.max_steps)
                all_correct, sure = False, False
                if correct and cfg.early_stop:  # the step's own forward decides where eval mode changes nothing
                    all_correct, sure = ((correct, confident) if same_in_eval else
                                         _all_correct_eval(batches, train_modules, prefix, prompts, cfg.stop_prob))
                if all_correct:
                    first_correct = first_correct or step
                    # [choice] the margin gets as many steps again as the argmax took: from then on the first
                    # all-argmax step ends training, so a model whose probabilities cannot reach stop_prob
                    # (flat logits) still stops
                    if sure or step >= 2 * first_correct:
                        break
                opt.step()
            else:
                if not cfg.early_stop and cfg.max_steps > 0:  # the ledger says whether the edit took, all the same
                    with torch.no_grad():
                        all_correct = _all_correct_eval(batches, train_modules, prefix, prompts)[0]
    finally:
        for m, mode in zip(train_modules, modes):
            m.train(mode)
    if progress:
        progress(stage, cfg.max_steps, cfg.max_steps)
    return TrainStats(steps=step, loss=loss_value, all_correct=all_correct, seconds=time.perf_counter() - t0)


def _hits(logits: torch.Tensor, answers: torch.Tensor, min_prob: float) -> tuple[bool, bool]:
    """(every target token is the argmax, and also has at least `min_prob` probability; True when 0).

    Why a probability: an edit trained only until its target is the argmax holds it by the narrowest
    margin on its own prompt, and a rephrasing that gets the same expert output in another context
    loses it; a margin on the edit prompt is what carries over."""
    if not bool((logits.argmax(-1) == answers).all()):
        return False, False
    if min_prob <= 0:
        return True, True
    probs = logits.float().softmax(-1).gather(-1, answers.unsqueeze(-1))
    return True, bool((probs >= min_prob).all())


def _mode_dependent(module: nn.Module) -> bool:
    """Whether `module` computes differently in training mode (dropout, batch norm, a noisy router): then an
    early stop must be confirmed by an eval-mode pass; otherwise the training forward's verdict is that
    pass's, for the same parameters (the check comes before the optimiser step), and the pass is skipped."""
    return any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
               or getattr(m, "noisy", False) for m in module.modules())


@torch.no_grad()
def _all_correct_eval(batches: list[Batch], train_modules: Sequence[torch.nn.Module], prefix: FrozenPrefix,
                      prompts: PromptCache, min_prob: float = 0.0) -> tuple[bool, bool]:
    """With the trainable modules in eval mode, in one pass: (every target token is the argmax, and every
    one also has probability ≥ `min_prob`)."""
    for m in train_modules:
        m.eval()
    sure = True
    try:
        for j, batch in enumerate(batches):
            with prefix.batch(j):
                logits, answers = prompts.answer_logits(j, batch)
            hit, confident = _hits(logits, answers, min_prob)
            if not hit:
                return False, False
            sure &= confident
        return True, sure
    finally:
        for m in train_modules:
            m.train()


class _Replay(LayerStandIn):
    """A frozen decoder layer that, for a batch already seen, returns the prefix's stored output."""

    def __init__(self, inner: nn.Module, index: int, owner: FrozenPrefix) -> None:
        super().__init__(inner)
        self.index = index
        object.__setattr__(self, "owner", owner)  # not a submodule

    def forward(self, *args, **kwargs):
        owner = self.owner
        key = owner.key_of(args[0] if args else kwargs.get("hidden_states"))
        hooks = self.inner._forward_hooks  # observers of this layer (a question key) see its own output
        if key is not None and key in owner.outputs:
            for hook in hooks.values():
                hook(self.inner, args, owner.outputs[(*key, self.index)])
            return owner.outputs[key]
        out = self.inner(*args, **kwargs)
        if key is not None and self.index == owner.depth - 1:
            owner.outputs[key] = out
        if key is not None and hooks:
            owner.outputs[(*key, self.index)] = out
        return out


class FrozenPrefix:
    """Runs the decoder layers below the trainable ones once per training batch, then replays them.

    Why: an edit trains only modules at one layer L (the bypass, a LoRA, a codebook), so for a fixed
    batch everything below L computes the same hidden states at every step; on a 30-layer model
    with L = 25 that is five sixths of each forward. Exact: layer L receives the very tensor the first
    pass computed. The layers are swapped for replaying wrappers inside the `with` block only; the
    stored outputs are keyed by batch and shape (a pass on a subset of the rows, such as the base-output
    signature pass, is stored apart) and dropped at the end. With no trainable parameter inside a decoder
    layer, or none given, nothing is replayed.
    """

    def __init__(self, model, params: Sequence[torch.nn.Parameter]) -> None:
        from moecli.model.loading import decoder_layers

        self.layers = decoder_layers(model) if params else None
        self.depth = 0
        if self.layers is not None:
            ids = {id(p) for p in params}
            owning = [i for i, layer in enumerate(self.layers) if any(id(q) in ids for q in layer.parameters())]
            inside = {id(q) for i in owning for q in self.layers[i].parameters()}
            self.depth = min(owning) if owning and ids <= inside else 0
        self.outputs: dict = {}
        self._batch = None
        self._originals: list[nn.Module] = []

    def key_of(self, hidden) -> tuple | None:
        """(batch, shape, whether the columns are fed behind a KV cache) of the pass a layer is in.

        Why the third part: the prompt cache runs two passes of one batch that can have the same shape, the
        one that fills the cache (columns 0 to w) and the one fed behind it (w columns from each row's last
        prompt token). Keyed by shape alone, the second replayed the first's hidden states: on Gemma 3 270M
        such batches trained to every target and answered as the unedited model (ZsRE records 90-99)."""
        if self._batch is None:
            return None
        while isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if not torch.is_tensor(hidden):
            return None
        return (self._batch, tuple(hidden.shape), current_feed().whole is not None)

    @contextmanager
    def batch(self, key) -> Iterator[None]:
        """Forwards inside this block are of batch `key` (the same key means the same inputs)."""
        self._batch = key
        try:
            yield
        finally:
            self._batch = None

    def __enter__(self) -> FrozenPrefix:
        if self.depth > 0:
            self._originals = [self.layers[i] for i in range(self.depth)]
            for i, layer in enumerate(self._originals):
                self.layers[i] = _Replay(layer, i, self)
        return self

    def __exit__(self, *exc) -> None:
        for i, layer in enumerate(self._originals):
            self.layers[i] = layer
        self._originals, self.outputs = [], {}


class PromptCache:
    """Feeds each row of a training batch from its own last prompt token on, the columns before it held in
    a KV cache filled once per batch by the unedited model.

    Why exact: a module that acts only from each prompt's last token on (the bypass with `positions:
    answer`) cannot change an earlier position in any layer, attention being causal, so the keys and
    values there are the unedited model's at every step. Each step then runs the last prompt token and
    the answer of each row (2–4 columns of ~11 on CounterFact) instead of every column, in every layer
    from the trained one up: row i's columns are gathered from its own start, with explicit positions,
    and the cached columns it must not see (another row's longer prompt) are masked. The anchors,
    routes and signature are still those of the whole input (`moecli.model.feed` hands it to the bypass).
    Without `unedited`, or where the model returns no cache it can copy, a batch is fed whole.
    """

    def __init__(self, model, unedited: Callable[[], AbstractContextManager] | None) -> None:
        self.model, self.unedited = model, unedited
        self.caches: dict = {}
        names = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in names else "past_key_values"  # renamed in transformers 5.24

    def answer_logits(self, key, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, vocab], answer tokens [N]) at the answer positions of `batch` (the `key`-th batch)."""
        device = batch.input_ids.device
        starts = torch.tensor([n - 1 for n in batch.prompt_lengths], device=device)
        window = getattr(self.model.config, "sliding_window", None)
        if isinstance(window, int) and batch.input_ids.shape[1] > window:
            # sliding-window masks count cache columns, not positions: every row from the same column
            starts = torch.full_like(starts, int(starts.min()))
        width = int(starts.max())
        if self.unedited is None or width < 1:
            return answer_logits(self.model, batch)[:2]
        if key not in self.caches:
            cache = self._fill(batch, width)
            self.caches[key] = cache if cache is not None and self._exact(batch, cache, starts, width) else None
        cache = self.caches[key]
        if cache is None:
            return answer_logits(self.model, batch)[:2]
        return self._cached_logits(batch, cache, starts, width)

    @torch.no_grad()
    def _exact(self, batch: Batch, cache, starts: torch.Tensor, width: int) -> bool:
        """Whether the cached path gives this batch the logits of a whole forward, checked once per batch.

        Why: on Gemma 3 270M some batches' cached forward was not the whole one (a ZsRE batch trained to every
        target the argmax evaluated at Rel 0.17; fed whole, Rel 1.0). The cause, found since (`FrozenPrefix.
        key_of`), is fixed; the check stays as the net that caught it: a batch where the two differ is fed whole."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # no gate noise: the two passes must differ only by the cache
        try:
            with torch.random.fork_rng(devices=[]):  # and training's own random draws stay as they were
                whole = answer_logits(self.model, batch)[0].float()
                cached = self._cached_logits(batch, cache, starts, width)[0].float()
        finally:
            for module, mode in modes.items():
                module.train(mode)
        return bool((whole - cached).abs().max() <= 1e-2 + 1e-3 * whole.abs().max())

    def _cached_logits(self, batch: Batch, cache, starts: torch.Tensor, width: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`answer_logits` of `batch` from its own last prompt tokens on, the columns before them from `cache`."""
        device = batch.input_ids.device
        step_cache = copy.copy(cache)  # each step appends its columns to its own copy of the layers
        step_cache.layers = [copy.copy(layer) for layer in cache.layers]
        lengths = batch.attention_mask.sum(1)
        span = torch.arange(int((lengths - starts).max()), device=device)
        cols = (starts.unsqueeze(1) + span).clamp(max=batch.input_ids.shape[1] - 1)  # row i from its own start
        fed = span.unsqueeze(0) < (lengths - starts).unsqueeze(1)
        seen = torch.arange(width, device=device).unsqueeze(0) < starts.unsqueeze(1)  # cached columns row i sees
        mask = torch.cat([seen, fed], dim=1).long()
        rows, at = torch.nonzero(batch.labels[:, 1:] != -100, as_tuple=True)
        with feeding(whole=(batch.input_ids, batch.attention_mask, starts)), logits_at(self.model, rows,
                                                                                        at - starts[rows]):
            logits = forward(self.model, batch, input_ids=batch.input_ids.gather(1, cols), attention_mask=mask,
                             position_ids=cols, use_cache=True, **{self._cache_arg: step_cache})
        return logits.reshape(-1, logits.shape[-1]), batch.labels[rows, at + 1]

    @torch.no_grad()
    def _fill(self, batch: Batch, width: int):
        """The unedited model's KV cache of the first `width` columns (each row sees only those before its
        own last prompt token)."""
        empty = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        with self.unedited(), logits_at(self.model, empty, empty):
            out = self.model(input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width],
                             use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return cache if isinstance(getattr(cache, "layers", None), list) else None


def retain_loss(model, retain: RetainSet) -> torch.Tensor:
    """KL(base ‖ edited) over every non-pad position of the retain prompts."""
    batch = retain.batch
    logits = forward(model, batch).float()
    kl = F.kl_div(logits.log_softmax(-1), retain.log_probs, log_target=True, reduction="none").sum(-1)
    mask = batch.attention_mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1)
