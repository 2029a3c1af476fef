"""LocFT-BF (Yang et al., ICLR 2026; code ICT-STAR/LocFT): fine-tune one FFN down-projection, breadth-first.

What makes it strong in free generation is the schedule, not the parameters (the same whole weight
matrix FT-L trains): every edit so far is revisited in each epoch, in mini-batches of 100 with one
Adam step each, the order reshuffled per epoch, and each target is trained followed by the tokenizer's
end-of-sequence token, so the edited prompt answers and stops. The public code trains one data file at
once; in a stream (`lifelong`, `--adapter`) each batch here trains the accumulated edits (`accumulate`),
which is what breadth-first means for a stream and costs one more pass over the old edits per batch.

Differences from the public code, all [choice]: mini-batches are drawn once (seeded) and only their
order is reshuffled per epoch (the frozen-prefix and prompt caches stay exact); the loss is the mean
over target tokens of a mini-batch (theirs: per example, then over the batch); the default layer is
at 0.71 of the depth (their LLaMA-3-8B layer 22 of 32), the weight is `mlp.down_proj` or the family's
equivalent (`find_target_module`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from moecli.adapter.training import Progress
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import layer_fraction_option, option
from moecli.methods.finetune import FineTune, FTConfig

EDITS_FILE = "locft_edits.json"


@dataclass
class LocFTConfig(FTConfig):
    """LocFT-BF options; defaults are the public code's `hparams/llama3-8b.yaml` unless marked [choice]."""

    layer_fraction: float = layer_fraction_option(0.71, "[LocFT] layer 22 of LLaMA-3-8B's 32")
    lr: float = option(5e-4, "[LocFT] learning rate of Adam")
    max_steps: int = option(25, "[LocFT num_steps] epochs over the (accumulated) edits")
    mini_batch: int = option(100, "[LocFT batch_size] edits per optimiser step")
    loss_stop: float = option(1e-2, "[LocFT] a mini-batch under this loss takes no step; an epoch under it ends "
                                    "training")
    early_stop: bool = option(False, "[LocFT] no argmax stop: the loss decides (loss_stop)")
    eos_target: bool = option(True, "[LocFT] train target + the tokenizer's end-of-sequence token, so the edited "
                                    "prompt answers and stops")
    accumulate: bool = option(True, "[choice] each batch of a stream trains every edit so far (breadth-first)")

    def validate(self) -> None:
        super().validate()
        if self.mini_batch < 1:
            raise UserError(f"mini_batch must be ≥ 1 (got {self.mini_batch})")
        if self.loss_stop < 0:
            raise UserError(f"loss_stop must be ≥ 0 (got {self.loss_stop})")


class LocFT(FineTune):
    """FT-L's weight and bookkeeping (`W0` aside, the checkpoint holds `W − W0`), LocFT-BF's schedule."""

    name = "locft"
    config_class = LocFTConfig
    config: LocFTConfig

    def __init__(self, loaded, config: LocFTConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        self.edits: list[tuple[str, str]] = []  # every (prompt, target) trained so far, in stream order

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        new = [(r.prompt, r.target) for r in records]
        pairs = [*self.edits, *new] if self.config.accumulate else new
        stats = self.train_weight(pairs, progress, mini_batch=self.config.mini_batch, loss_stop=self.config.loss_stop,
                                  optimizer="adam", seed=self.seed * 1_000_003 + batch_index)
        self.edits += new
        return stats

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        config, tensors, files = super().export_state()
        return config, tensors, {**files, EDITS_FILE: json.dumps(self.edits).encode()}

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        super().load_state(adapter_config, tensors, files)
        self.edits = [tuple(pair) for pair in json.loads(files.get(EDITS_FILE, b"[]"))]
