"""MEMoE (Wang & Li, arXiv 2405.19086): batch editing with knowledge-anchor routing.

E experts beside the target module, all trainable and trained together on the whole batch; a gate
over `concat(x_t, anchor)` picks the top-k experts per token (noisy during training). Sequential
batch editing keeps training the same experts batch after batch (the forgetting LEMoE fixes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from moecli.adapter.bypass import BypassOptions
from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import option
from moecli.methods.bypass_method import BypassConfig, BypassMethod
from moecli.routing.routers import AnchorGate

EDITS_PER_RANK_16 = 50
"""Edits one expert of rank 16 takes at the largest load measured to keep Gen (see `MEMoEConfig.rank`)."""


@dataclass
class MEMoEConfig(BypassConfig):
    """MEMoE options; defaults are moecli's measured choices where the paper is silent."""

    rank: int | None = option(
        None, "[choice] rank of the low-rank experts; null: 16 per 50 edits an expert takes (top-1 routing spreads a "
              "batch over n_experts), at least 16. Every expert sees the whole batch's keys, and a rank-r delta "
              "that must answer too many of them trains to a small margin that rephrasings lose")
    n_experts: int = option(4, "[choice] number of experts")
    top_k: int = option(1, "[choice] experts per token")
    noisy_gate: bool = option(True, "[paper] noisy top-k gating during training")
    null_route: bool = option(True, "[choice] inputs naming no edited entity get no expert")
    aux_loss_weight: float = option(0.0, "[choice] weight of the Switch load-balancing loss (0: off)")
    null_gate: bool = option(False, "[choice] a learned per-token gate that lets the router leave a token alone")
    scope: bool = option(True, "[choice] act only on inputs that match an edit (same entity, same question)")

    def resolve(self, model: torch.nn.Module, model_fingerprint: dict | None = None,
                batch_size: int | None = None) -> None:
        """`rank: None`: 16 per `EDITS_PER_RANK_16` edits an expert takes (`batch_size` unknown: 16)."""
        super().resolve(model, model_fingerprint, batch_size)
        if self.rank is None:
            self.rank = 16 * max(1, math.ceil((batch_size or 0) / (EDITS_PER_RANK_16 * self.n_experts)))

    def validate(self) -> None:
        super().validate()
        if self.n_experts < 1:
            raise UserError(f"n_experts must be ≥ 1 (got {self.n_experts})")
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"top_k must be between 1 and n_experts={self.n_experts} (got {self.top_k})")


class MEMoE(BypassMethod):
    name = "memoe"
    config_class = MEMoEConfig
    config: MEMoEConfig

    def make_router(self) -> AnchorGate:
        c = self.config
        if c.scope:
            self.matcher = self.make_matcher(c.null_route)
        return AnchorGate(self.d_in, self.d_anchor, c.n_experts, c.top_k, c.noisy_gate, c.null_route, self.generator,
                          null_gate=c.null_gate)

    def bypass_options(self) -> BypassOptions:
        """All `n_experts` experts at once; with `scope`, the key matcher decides which inputs any expert sees."""
        c = self.config
        return replace(super().bypass_options(), experts=c.n_experts, scope=self.matcher,
                       unmatched_get_nothing=c.null_route)

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        self.register_anchors(records)
        if self.matcher is not None:
            self.store_edits(records, [batch_index] * len(records))
        retain = self.retain_set(records)
        params = self.trainable([self.bypass.experts, self.bypass.router])
        router = self.bypass.router
        weight = self.config.aux_loss_weight

        def aux():
            return router.aux_loss * weight if weight > 0 and router.aux_loss is not None else None

        try:
            with self.augmented_routes(records):
                stats = train_on_pairs(
                    self.loaded.model, self.loaded.tokenizer, params, self.edit_pairs(records),
                    self.config.train_config(), extra_loss=aux, retain=retain, train_modules=[self.bypass],
                    progress=progress, unedited=None if weight > 0 else self.unedited(),  # that loss sees every token
                )
        finally:
            self.freeze([self.bypass])
        return {"steps": stats.steps, "loss": stats.loss, "all_correct": stats.all_correct,
                "seconds": stats.seconds}
