"""SCEN (Yao et al., COLM 2024): one expert per edit, gated by a trained indexing neuron.

Stage 1 [paper]: for each edit alone, a fresh expert is trained with every input forced to it (in
the authors' code a copy of the target weight *replaces* the module; moecli stores the delta, dense
or low-rank, which is the same function `W0 x + ΔW x`). Stage 2 [paper]: a fresh indexing neuron
`w_i` is trained so that `sigmoid(w_i · h)` is high on the edit's last prompt token and low on the
earlier edits'. Their loss, as coded: `exp(-s_p) + mean(exp(s_n) + 0.7) + mean(exp(s_n) - s_p + 0.3)`.
At inference the best neuron over θ selects its expert for the whole generation.

[choice] options beyond the paper: a hinge margin loss, unrelated negatives (the records' locality
prompts: off by default, since those are also what Loc measures), a cap on negatives per neuron
(stage 2 is otherwise quadratic in the stream), FAISS search when neurons are many.

Bytes per edit (fp32): dense delta d_in·d_out·4 + neuron d_in·4; lowrank r·(d_in+d_out)·4 + d_in·4.
LLaMA2-7B layer 20 (11008 → 4096): dense 180.4 MB + 44 KB per edit (what the paper stores, as a
full copy); lowrank r=16: 0.97 MB + 44 KB.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from moecli.adapter.bypass import BypassOptions
from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import option
from moecli.methods.bypass_method import BypassConfig, BypassMethod
from moecli.routing.routers import IndexingNeuronRouter


@dataclass
class SCENConfig(BypassConfig):
    """SCEN options. the `scen-paper` recipe holds the authors' values (Adam 1e-4, 10/20 steps)."""

    threshold: float = option(0.65, "θ: the best indexing neuron's score must exceed it for its expert to run "
                                    "[paper: 0.65 ZsRE, 0.6 hallucination]")
    neuron_lr: float = option(1e-2, "learning rate (Adam) of each indexing neuron")
    neuron_steps: int = option(50, "optimisation steps of each indexing neuron")
    neuron_loss: str = option("scen", "scen (the authors' loss, as coded) | hinge (see margin)")
    margin: float = option(0.2, "hinge: s_p ≥ θ + margin, s_n ≤ θ − margin")
    max_negatives: int = option(256, "[choice] cap on earlier edits used as a neuron's negatives (0: all): stage 2 "
                                     "is otherwise quadratic in the stream")
    locality_negatives: bool = option(False, "[choice] also push the records' locality prompts below θ (off: those "
                                             "are also what Loc measures)")
    faiss_above: int = option(4096, "search the neurons with FAISS once there are more than this")
    normalize_inputs: bool = option(True, "[choice] neurons score h scaled to unit RMS, so θ means the same on every "
                                          "model (paper: raw h)")
    scope: bool = option(True, "[choice] neurons compete only among the edits the key matcher accepts (paper: all "
                               "neurons)")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.threshold < 1.0:
            raise UserError(f"threshold must be in (0, 1) (got {self.threshold})")
        if self.neuron_loss not in ("scen", "hinge"):
            raise UserError(f"neuron_loss must be scen or hinge (got {self.neuron_loss!r})")
        if self.max_negatives < 0:
            raise UserError(f"max_negatives must be ≥ 0 (got {self.max_negatives})")


class SCEN(BypassMethod):
    name = "scen"
    config_class = SCENConfig
    config: SCENConfig

    def __init__(self, loaded, config: SCENConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        self.keys: list[torch.Tensor] = []  # h of each edit's last prompt token (negatives for later neurons)
        self._rng = random.Random(seed)
        self._experts_of_last: list[int] = []

    def make_router(self) -> IndexingNeuronRouter:
        c = self.config
        router = IndexingNeuronRouter(self.d_in, c.threshold, c.faiss_above, c.normalize_inputs)
        if c.scope:
            self.matcher = self.make_matcher()
            router.scope = self.matcher  # the router's constructor takes no scope
        return router

    def bypass_options(self) -> BypassOptions:
        """With `scope`, the router's key matcher null-routes every input that names no edited entity."""
        return replace(super().bypass_options(), unmatched_get_nothing=self.config.scope)

    @contextmanager
    def forced(self, expert_id: int) -> Iterator[None]:
        """Stage 1: every input goes to `expert_id`, those that name no edited entity too, so the bypass's
        shortcut for a forward in which none does is off meanwhile."""
        router: IndexingNeuronRouter = self.bypass.router
        shortcut = self.bypass.unmatched_get_nothing
        router.forced, self.bypass.unmatched_get_nothing = expert_id, False
        try:
            yield
        finally:
            router.forced, self.bypass.unmatched_get_nothing = None, shortcut

    def last_token_inputs(self, prompts: list[str]) -> torch.Tensor:
        """The target module's input at each prompt's last token (what the neurons score)."""
        return self.probe(prompts)[1]

    def _train_neuron(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        c = self.config
        pos, neg = self.bypass.router.prepare(pos), self.bypass.router.prepare(neg)
        w = torch.empty(pos.shape[-1])
        bound = pos.shape[-1] ** -0.5
        w.uniform_(-bound, bound, generator=self.generator)
        w = w.to(pos.device).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=c.neuron_lr)
        for _ in range(c.neuron_steps):
            s_p = torch.sigmoid(pos @ w)
            s_n = torch.sigmoid(neg @ w) if len(neg) else None
            if c.neuron_loss == "hinge":
                loss = torch.relu(c.threshold + c.margin - s_p).mean()
                if s_n is not None:
                    loss = loss + torch.relu(s_n - (c.threshold - c.margin)).mean()
                if float(loss.detach()) == 0.0:
                    break
            else:  # the authors' loss, as coded
                loss = torch.exp(-s_p).mean()
                if s_n is not None:
                    loss = loss + (torch.exp(s_n) + 0.7).mean() + (torch.exp(s_n) - s_p.mean() + 0.3).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return w.detach()

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        """Each record of the batch is its own edit: an expert, then its indexing neuron."""
        c = self.config
        router: IndexingNeuronRouter = self.bypass.router
        steps, all_correct, seconds = 0, True, 0.0
        self._experts_of_last = []
        for k, r in enumerate(records):
            expert_id = self.bypass.add_expert(self.generator)
            if self.matcher is not None:
                self.register_anchors([r])
                self.store_edits([r], [expert_id])
            try:
                with self.forced(expert_id), self.augmented_routes([r]):
                    params = self.trainable([self.bypass.experts[expert_id]])
                    stats = train_on_pairs(self.loaded.model, self.loaded.tokenizer, params, self.edit_pairs([r]),
                                           c.train_config(optimizer="adam"), unedited=self.unedited())
            finally:
                self.freeze([self.bypass])
            steps, seconds = steps + stats.steps, seconds + stats.seconds
            all_correct &= stats.all_correct
            h = self.last_token_inputs([r.prompt])
            negatives = list(self.keys)
            if c.max_negatives and len(negatives) > c.max_negatives:
                negatives = self._rng.sample(negatives, c.max_negatives)
            neg = torch.stack(negatives) if negatives else torch.zeros(0, h.shape[-1], device=h.device)
            if c.locality_negatives and r.locality:
                neg = torch.cat([neg, self.last_token_inputs([lp.prompt for lp in r.locality])])
            router.add_neuron(self._train_neuron(h, neg))
            self.keys.append(h[0])
            self._experts_of_last.append(expert_id)
            if progress:
                progress("edits", k + 1, len(records))
        return {"steps": steps, "all_correct": all_correct, "seconds": seconds}

    def expert_of(self, record_index_in_batch: int) -> int | None:
        return self._experts_of_last[record_index_in_batch] if self._experts_of_last else None

    def routes(self, prompts: list[str]) -> list[int | None]:
        """The edit whose indexing neuron wins (one expert per edit, so its id is the edit's order)."""
        if len(self.bypass.experts) == 0 or not self._routed_pass(prompts):
            return [None] * len(prompts)
        chosen = self.bypass.router._cached[1][:, 0].tolist()
        return [int(e) if e >= 0 else None for e in chosen]

    def export_state(self):
        config, tensors, files = super().export_state()
        tensors["scen.keys"] = (torch.stack(self.keys) if self.keys else torch.zeros(0, self.d_in)).cpu()
        return config, tensors, files

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        tensors = dict(tensors)
        keys = tensors.pop("scen.keys", torch.zeros(0, self.d_in))
        self.bypass.router.neurons = torch.zeros_like(tensors.get("router.neurons", torch.zeros(0, self.d_in)))
        super().load_state(adapter_config, tensors, files)
        self.keys = [k.to(self.loaded.device) for k in keys]
