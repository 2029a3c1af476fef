"""WISE (Wang et al., NeurIPS 2024, arXiv 2405.14768): a side memory beside one FFN down-projection.

The target module's weight `W` (the main memory) stays frozen. Edits go into *side memories*, each a
copy of `W` that training moves; moecli stores a side memory as its change `D = W_side − W` [choice:
what is stored, the same function]. For an input x, with `A(x)` the module's input (the FFN's
activations) at each token, the routing activation of side memory D is

    Δ_act(x) = mean over the prompt's tokens of ‖A(x)·Dᵀ‖₂ = ‖W_side A(x) − W A(x)‖₂   [paper, eq. 3]

and an input whose largest Δ_act exceeds that memory's threshold runs the module with that side memory
at every position; any other input gets the main memory, the base model's output bit for bit. The
threshold of a memory is `act_ratio` × the smallest Δ_act its edits had at the end of their training
[EasyEdit `editing_mean_act.min_act() * act_ratio`]. The decision is taken once per input on its prompt
tokens (the same in training, teacher-forced scoring and generation; later generation steps keep it).

Training a batch [paper, Alg. 1; EasyEdit `WISE.edit`]: the edit loss on the answer tokens of every
edit prompt and of `prefixes` copies of it behind random prefixes the model writes itself (random
prefix augmentation: ROME's context templates, 5 of 5 and 5 of 10 tokens), plus the margin loss that
makes edit inputs x_e activate the side memory and irrelevant inputs x_i not:

    L_a = relu(Δ(x_i) − α) + relu(β − Δ(x_e)) + relu(γ − (Δ(x_e) − Δ(x_i)))   [paper, eq. 5]

each term the mean of its positive entries over all edit rows / irrelevant rows / pairs, as EasyEdit
computes it. Irrelevant inputs: EasyEdit takes each training record's locality prompt (an NQ question);
moecli has no held-out data at edit time and never uses the evaluation's, so [choice] they are texts
the model writes itself from generic starts (`irrelevant_per_edit` per edit, from a fixed pool).
SGD at lr 1.0 for 70 steps, no early stop, each element of D kept within ±`norm_constraint` [EasyEdit].

Knowledge sharding and merging [paper §3.3]: every `shard_edits` edits start a new shard, whose
gradients only reach a random `mask_ratio` of the side memory's elements (a fresh Bernoulli mask per
shard [EasyEdit `generate_activation_mask`]); a closed shard is kept as a memory of its own. Every
`merge_edits` edits, the shards closed since the last merge are Ties-merged into one memory (trim each
to its `density` largest changes, elect a sign per element by the summed change, average the changes
that agree; EasyEdit's `GTA('magnitude', 'sum', normalize=True)`). With `retrieve` (WISE-Retrieve,
EasyEdit's default yaml) every merged memory stays apart and routing picks the one with the largest
Δ_act; without it (WISE-Merge) the new merge is folded into the single earlier one (weights 0.4 for the
new shards, 0.6 for it [EasyEdit]). [choice] A closed shard that is not yet merged still routes (EasyEdit's
WISE-Merge ignores it until the merge).

Where moecli departs from EasyEdit, and why: Δ_act is the paper's ‖A(x)(W_side − W)‖ (EasyEdit applies the
model's activation function to both outputs first); it averages over the prompt's tokens, never padding
or the answer (EasyEdit: every column of the padded batch), so training and inference see one function;
SGD without weight decay (EasyEdit's 1e-5 decays the whole copied weight; here D, whose unmasked
elements must stay zero); a batch of edits trains together (EasyEdit edits one request at a time).

Checkpoint: `wise.memories` [K, d_out, d_in] and `wise.min_acts` [K] (the closed and merged memories),
`wise.current` (the open shard), its running minimum and the edit count in the adapter config.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moecli.adapter.augment import MAX_PREFIXES, context_prefixes, sample_text
from moecli.adapter.bypass import Injection, bypass_disabled, flat_batch
from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import EditMethod, MethodConfig, layer_fraction_option, option
from moecli.model.batching import collate, forward, logits_at, pad_id_of, prompt_only
from moecli.model.loading import LoadedModel
from moecli.routing.context import AnchorContext, mean_embedding
from moecli.routing.keys import KeyMatcher

IRRELEVANT_STARTS = ("In", "A", "It", "This", "When", "There", "We", "He", "She", "My", "Our", "After")
IRRELEVANT_TOKENS = 12


@dataclass
class WISEConfig(MethodConfig):
    """WISE options; defaults are EasyEdit's `hparams/WISE/llama-7b.yaml` unless marked [choice]."""

    layer: int | None = option(None, "decoder layer whose FFN down-projection gets the side memory; null: the one "
                                     "`layer_fraction` gives")
    layer_fraction: float = layer_fraction_option(0.87, "[paper] index 27 of LLaMA2-7B's 0..31")
    lr: float = option(1.0, "[EasyEdit edit_lr] learning rate")
    optimizer: str = option("sgd", "[EasyEdit] sgd | adam | adamw")
    max_steps: int = option(70, "[EasyEdit n_iter] optimisation steps per batch")
    early_stop: bool = option(False, "[EasyEdit] all n_iter steps: the margins keep training after the answer is "
                                     "right")
    mask_ratio: float = option(0.2, "[EasyEdit] share of the side memory's elements a shard may change")
    norm_constraint: float = option(1.0, "[EasyEdit] every element of W_side − W stays within ±this")
    alpha: float = option(5.0, "[EasyEdit act_margin] irrelevant inputs: Δ_act below α")
    beta: float = option(20.0, "[EasyEdit act_margin] edit inputs: Δ_act above β")
    gamma: float = option(10.0, "[EasyEdit act_margin] edit inputs: Δ_act at least γ above every irrelevant input")
    act_ratio: float = option(0.88, "[EasyEdit] a memory's threshold is act_ratio × the smallest Δ_act of its edits")
    shard_edits: int = option(500, "[EasyEdit save_freq] edits per shard (a new random mask each)")
    merge_edits: int = option(1000, "[EasyEdit merge_freq] shards closed in this many edits are Ties-merged")
    retrieve: bool = option(True, "[EasyEdit yaml] keep merged memories apart (WISE-Retrieve); false: one "
                                  "(WISE-Merge)")
    density: float = option(0.53, "[EasyEdit densities] Ties: share of each shard's largest changes kept")
    prefixes: int = option(10, "[EasyEdit/ROME] random-prefix copies of each edit prompt (0: none)")
    irrelevant_per_edit: int = option(1, "[choice; EasyEdit: one locality prompt per edit] model-written texts per "
                                         "edit that must not activate the side memory")

    def validate(self) -> None:
        super().validate()
        for name in ("mask_ratio", "density"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in (0, 1] (got {getattr(self, name)})")
        for name in ("norm_constraint", "act_ratio"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        if self.shard_edits < 1 or self.merge_edits < self.shard_edits:
            raise UserError(f"shard_edits must be ≥ 1 and merge_edits ≥ shard_edits (got {self.shard_edits}, "
                            f"{self.merge_edits})")
        if not 0 <= self.prefixes <= MAX_PREFIXES:
            raise UserError(f"prefixes must be between 0 and {MAX_PREFIXES} "
                            f"(got {self.prefixes})")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise UserError(f"optimizer must be sgd, adam or adamw (got {self.optimizer!r})")
        if self.irrelevant_per_edit < 1:
            raise UserError(f"irrelevant_per_edit must be ≥ 1 (got {self.irrelevant_per_edit})")


def activation(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Δ_act per row [B]: the mean over the tokens set in `mask` [B, T] of ‖x·deltaᵀ‖₂ (x [B, T, d_in])."""
    return activation_of(x.float() @ delta.t().float(), mask)


def activation_of(change: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Δ_act per row [B] from the change x·deltaᵀ [B, T, d_out] itself (`WiseLayer.choose` keeps it)."""
    return mean_embedding(change.norm(dim=-1).unsqueeze(-1), mask)[:, 0]


def positive_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries (0 when none is): each margin term of EasyEdit's activation loss."""
    pos = values[values > 0]
    return pos.mean() if pos.numel() else values.sum() * 0.0


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Ties-merging (Yadav et al. 2023) of task vectors: keep each one's `density` largest |changes|, elect
    each element's sign by the weighted sum, and take the weighted mean of the kept changes of that sign."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        flat = d.reshape(-1).abs()
        cut = torch.topk(flat, k, sorted=False).values.min() if k < flat.numel() else flat.min()
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * deltas[0].dim()))
    weighted = stacked * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (stacked.sign() == sign).to(stacked.dtype)
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


class WiseLayer(nn.Module):
    """The frozen target module with side memories; a `WrappedLayer` for `Injection`.

    `memories` (closed and merged, frozen) and `current` (the open shard, trained) are changes of the
    module's weight, applied as `x·Dᵀ` beside the untouched base output (a Linear or a GPT-2 Conv1D alike).
    """

    def __init__(self, base: nn.Module, d_in: int, d_out: int, context: AnchorContext, act_ratio: float) -> None:
        super().__init__()
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.context = context
        self.act_ratio = act_ratio
        self.enabled = True
        self.matcher: KeyMatcher | None = None  # routes by activation, not by a key matcher
        self.editing = False  # training: every row runs the open shard's side memory
        device = next(base.parameters()).device
        self.current = nn.Parameter(torch.zeros(d_out, d_in, device=device), requires_grad=False)
        self.current_min = math.inf  # the smallest Δ_act of the open shard's edits (inf: none yet)
        self.memories: list[torch.Tensor] = []
        self.min_acts: list[float] = []
        self.capture = False  # forward keeps its input (`captured`), for the activation loss and thresholds
        self.captured: torch.Tensor | None = None
        self.last_choice: torch.Tensor | None = None  # memory per row of the last prompt forward (−1: main)

    def candidates(self) -> list[tuple[torch.Tensor, float]]:
        """(change, threshold) of every side memory that holds edits, the open shard last."""
        out = [(d, a * self.act_ratio) for d, a in zip(self.memories, self.min_acts)]
        if math.isfinite(self.current_min):
            out.append((self.current.detach(), self.current_min * self.act_ratio))
        return out

    def prompt_mask(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] the prompt's tokens in this forward: attended columns up to each row's last prompt token."""
        ctx = self.context
        b, t = x.shape[0], x.shape[1]
        cols = torch.arange(t, device=x.device).unsqueeze(0)
        last = ctx.prompt_last.to(x.device) if ctx.prompt_last is not None else torch.full((b,), t - 1, device=x.device)
        mask = cols <= last.unsqueeze(1)
        attention = ctx.attention
        if attention is not None and tuple(attention.shape) == (b, t):
            mask &= attention.to(x.device).bool()
        return mask

    @torch.no_grad()
    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Side memory per row [B] (index into `candidates()`), −1 where none passes its threshold; and the
        chosen memories' change `x·Dᵀ` [B, T, d_out] (zero on rows without one; None when no row has one),
        kept from the activation test so that it is not computed twice."""
        b = x.shape[0]
        choice = torch.full((b,), -1, dtype=torch.long, device=x.device)
        best = torch.full((b,), -math.inf, device=x.device)
        change = None
        mask = self.prompt_mask(x)
        for i, (delta, threshold) in enumerate(self.candidates()):
            product = x.float() @ delta.to(x.device).t().float()
            act = activation_of(product, mask)
            take = (act >= threshold) & (act > best)
            if bool(take.any()):
                keep = take.view(-1, 1, 1)
                change = torch.where(keep, product, change if change is not None else torch.zeros_like(product))
            choice = torch.where(take, torch.full_like(choice, i), choice)
            best = torch.where(take, act, best)
        return choice, change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = flat_batch(x, self.context)
        if b is not None:
            return self._forward3(x.view(b, -1, x.shape[-1]), y.view(b, -1, y.shape[-1])).view_as(y)
        return self._forward3(x, y)

    def _forward3(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.captured = x.detach()
        if not self.enabled:
            return y
        if self.editing:
            return y + (x @ self.current.t().to(x.dtype)).to(y.dtype)
        ctx = self.context
        cached = self.last_choice
        if not (ctx.continuation and cached is not None and cached.shape[0] == x.shape[0]):
            choice, change = self.choose(x)
            self.last_choice = choice
            return y if change is None else y + change.to(y.dtype)
        choice = cached.to(x.device)  # a later generation step: keep the prompt's decision
        if not bool((choice >= 0).any()):
            return y
        out = y.clone()
        memories = self.candidates()
        for i in choice[choice >= 0].unique().tolist():
            rows = choice == i
            delta = memories[i][0].to(device=x.device, dtype=x.dtype)
            out[rows] = y[rows] + (x[rows] @ delta.t()).to(y.dtype)
        return out


class WISE(EditMethod):
    """WISE's side memories at the target module; each batch trains the open shard."""

    name = "wise"
    config_class = WISEConfig
    config: WISEConfig

    def __init__(self, loaded: LoadedModel, config: WISEConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        target = self.locate()
        self.wise = WiseLayer(target, self.d_in, self.d_out, self.new_context(), config.act_ratio)
        self.wise.eval()
        self.injection: Injection | None = Injection(loaded.model, self.target_name, self.wise)
        self.edits = 0  # edits trained so far (shards and merges count them)
        self._prefix_texts: list[str] | None = None
        self._irrelevant: list[str] | None = None

    # -- texts the model writes itself
    @torch.no_grad()
    def _texts(self) -> tuple[list[str], list[str]]:
        """(random prefixes, irrelevant texts), written once per run by the unedited model, seeded."""
        if self._prefix_texts is None:
            gen = torch.Generator().manual_seed(self.seed * 7919 + 17)

            def unedited():
                return bypass_disabled(self.wise)

            self._prefix_texts = context_prefixes(self.loaded, MAX_PREFIXES, gen, unedited)
            self._irrelevant = [sample_text(self.loaded, s, IRRELEVANT_TOKENS, gen, unedited)
                                for s in IRRELEVANT_STARTS for _ in range(2)]
        return self._prefix_texts[: self.config.prefixes], self._irrelevant

    # -- shards
    def _mask_for(self, shard: int) -> torch.Tensor:
        """The open shard's gradient mask: Bernoulli(mask_ratio) per element, seeded by the shard index."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + shard)
        mask = torch.rand(self.d_out, self.d_in, generator=gen) < self.config.mask_ratio
        return mask.to(device=self.wise.current.device, dtype=self.wise.current.dtype)

    def _close_shard(self, before: int) -> None:
        """Keep the open shard as a memory; merge the shards closed since the last merge when this batch
        (which began after `before` edits) crossed a multiple of `merge_edits`."""
        w, c = self.wise, self.config
        if math.isfinite(w.current_min):
            w.memories.append(w.current.detach().clone())
            w.min_acts.append(w.current_min)
        with torch.no_grad():
            w.current.zero_()
        w.current_min = math.inf
        merges = before // c.merge_edits  # merges done so far: one memory each (retrieve), or one in all
        if self.edits // c.merge_edits == merges:
            return
        shards = len(w.memories) - (merges if c.retrieve else min(merges, 1))
        if shards < 1:
            return
        new, new_acts = w.memories[-shards:], w.min_acts[-shards:]
        rest, rest_acts = w.memories[:-shards], w.min_acts[:-shards]
        if c.retrieve or not rest:
            merged = ties_merge(new, [1.0 / len(new)] * len(new), c.density)
            w.memories, w.min_acts = [*rest, merged], [*rest_acts, min(new_acts)]
        else:  # WISE-Merge: one memory, the earlier merge weighted 0.6 [EasyEdit]
            merged = ties_merge([*new, rest[-1]], [0.4 / len(new)] * len(new) + [0.6], c.density)
            w.memories, w.min_acts = [merged], [min(new_acts + rest_acts)]

    # -- editing
    @torch.no_grad()
    def _inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The target module's inputs [N, T, d_in] on `prompts` (unedited model) and their token masks [N, T]."""
        tok = self.loaded.tokenizer
        batch = collate([prompt_only(tok, p) for p in prompts], pad_id_of(tok)).to(self.loaded.device)
        w = self.wise
        old = w.enabled
        w.enabled, w.capture = False, True
        empty = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        try:
            with logits_at(self.loaded.model, empty, empty):
                forward(self.loaded.model, batch)
        finally:
            w.enabled, w.capture = old, False
        x, w.captured = w.captured, None
        return x.view(len(prompts), -1, x.shape[-1]).float(), batch.attention_mask.bool()

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        c, w = self.config, self.wise
        shard = self.edits // c.shard_edits
        prefixes, irrelevant = self._texts()
        prompts = [p + r.prompt for r in records for p in ["", *prefixes]]
        pairs = [(p + r.prompt, r.target) for r in records for p in ["", *prefixes]]
        rng = random.Random(self.seed * 104_729 + batch_index)
        negatives = [rng.choice(irrelevant) for _ in range(len(records) * c.irrelevant_per_edit)]
        x_e, m_e = self._inputs(prompts)
        x_i, m_i = self._inputs(negatives)
        mask = self._mask_for(shard)

        def margin_loss() -> torch.Tensor:
            d = w.current
            act_e, act_i = activation(x_e, d, m_e), activation(x_i, d, m_i)
            return (positive_mean(act_i - c.alpha) + positive_mean(c.beta - act_e)
                    + positive_mean(c.gamma - (act_e.unsqueeze(1) - act_i.unsqueeze(0))))

        def clamp(*_: object) -> None:
            with torch.no_grad():
                w.current.clamp_(-c.norm_constraint, c.norm_constraint)

        w.current.requires_grad_(True)
        grad_hook = w.current.register_hook(lambda g: g * mask)
        clamp_hook = w.register_forward_pre_hook(clamp)
        w.editing = True
        try:
            stats = train_on_pairs(self.loaded.model, self.loaded.tokenizer, [w.current], pairs,
                                   c.train_config(optimizer=c.optimizer), step_loss=margin_loss,
                                   progress=progress)
        finally:
            w.editing = False
            grad_hook.remove()
            clamp_hook.remove()
            w.current.requires_grad_(False)
            w.current.grad = None
        clamp()
        with torch.no_grad():  # [EasyEdit save_editing_activation] per edit: its rows' mean Δ_act
            act = activation(x_e, w.current, m_e).view(len(records), -1).mean(1)
            act_i = activation(x_i, w.current, m_i)
        w.current_min = min(w.current_min, float(act.min()))
        self.edits += len(records)
        if self.edits // c.shard_edits > shard:
            self._close_shard(self.edits - len(records))
        return {"steps": stats.steps, "loss": stats.loss, "all_correct": stats.all_correct,
                "seconds": stats.seconds, "act_edit_min": float(act.min()), "act_irrelevant_max": float(act_i.max()),
                "memories": len(w.memories) + (1 if math.isfinite(w.current_min) else 0)}

    # -- checkpoint
    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        w = self.wise
        memories = torch.stack(w.memories) if w.memories else torch.zeros(0, self.d_out, self.d_in)
        tensors = {"wise.memories": memories.detach().cpu().contiguous(),
                   "wise.min_acts": torch.tensor(w.min_acts, dtype=torch.float32),
                   "wise.current": w.current.detach().cpu().contiguous()}
        config = {"method": self.name, **asdict(self.config), "layer": self.layer, "target_module": self.target_name,
                  "d_in": self.d_in, "d_out": self.d_out, "edits": self.edits,
                  "current_min_act": w.current_min if math.isfinite(w.current_min) else None}
        return config, tensors, {}

    @torch.no_grad()
    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        try:
            memories, min_acts, current = (tensors[f"wise.{k}"] for k in ("memories", "min_acts", "current"))
        except KeyError as exc:
            raise UserError(f"adapter: missing tensor {exc.args[0]!r} (not a WISE checkpoint)") from None
        shape = (self.d_out, self.d_in)
        if tuple(current.shape) != shape or tuple(memories.shape[1:]) != shape or min_acts.shape != memories.shape[:1]:
            raise UserError(f"adapter: WISE side memories do not fit {self.target_name} (d_in={self.d_in}, "
                            f"d_out={self.d_out})")
        w, dev = self.wise, self.wise.current.device
        w.memories = [m.float().to(dev).clone() for m in memories]
        w.min_acts = [float(a) for a in min_acts]
        w.current.copy_(current.to(dev))
        low = adapter_config.get("current_min_act")
        w.current_min = float(low) if low is not None else math.inf
        self.edits = int(adapter_config.get("edits", 0))

    def remove(self) -> None:
        if self.injection is not None:
            self.injection.remove()
            self.injection = None
