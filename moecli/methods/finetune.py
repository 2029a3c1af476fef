"""FT-L: fine-tune the target module's weight in place, the classic baseline that breaks locality.

Nothing is added to the model: the FFN output weight of one layer is trained directly with the
shared loop (`train_on_pairs`), everything else frozen. Because it has no router, every input
sees the changed weight, which is why FT-L forgets earlier edits and disturbs unrelated prompts.

Two properties every moecli method keeps, achieved here without a bypass:
- `remove()` restores the base model bit-identically: the original weight is copied aside on the
  first edit and copied back on removal.
- a checkpoint holds only the change, `delta = W − W0` (one weight matrix, not the model). The live
  weight is always *defined* as `W0 + delta` (recomputed after each batch), so a reload computes the
  very same tensor and reproduces metrics exactly; storing `W − W0` alone would not guarantee that,
  since `W0 + (W − W0)` need not round back to `W` in floating point.

Loss: the shared loop's masked cross-entropy on every target token, which is EasyEdit's FT-M
objective; EasyEdit's `objective_optimization: prompt_last` variant of FT-L is not offered, because
every moecli method trains with the one loop (its loss and early stop), so that they differ only in
what they train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import EditMethod, MethodConfig, layer_fraction_option, option
from moecli.model.loading import LoadedModel

DELTA_KEY = "ft.delta"


@dataclass
class FTConfig(MethodConfig):
    """FT-L options; defaults are EasyEdit's `hparams/FT/llama-7b.yaml` unless marked [choice]."""

    layer: int | None = option(None, "decoder layer whose FFN output weight is trained; null: the one "
                                     "`layer_fraction` gives")
    layer_fraction: float = layer_fraction_option(0.56, "[choice] LEMoE's depth (index 17 of LLaMA2-7B's 0..31)")
    lr: float = option(5e-4, "[EasyEdit] learning rate of Adam(W)")
    max_steps: int = option(25, "[EasyEdit num_steps] optimisation steps per batch")
    weight_decay: float = option(0.0, "[EasyEdit] AdamW weight decay (0: Adam)")
    early_stop: bool = option(True, "[choice] stop once every target token is the argmax (the shared loop)")
    norm_constraint: float | None = option(None, "[EasyEdit, off by default] clamp each weight to W0 ± this "
                                                 "(null: no clamp)")

    def validate(self) -> None:
        super().validate()
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise UserError(f"norm_constraint must be > 0 or null (got {self.norm_constraint})")


class FineTune(EditMethod):
    """FT-L: train `W` of the target module directly; keep `W0` aside to undo and to diff."""

    name = "ft"
    config_class = FTConfig
    config: FTConfig

    def __init__(self, loaded: LoadedModel, config: FTConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        self.target = self.locate()
        self.weight: torch.nn.Parameter = self.target.weight
        self.original: torch.Tensor | None = None  # W0, copied on the first edit
        self.delta: torch.Tensor | None = None  # W − W0 as stored; the live weight is W0 + delta

    def _keep_original(self) -> None:
        if self.original is None:
            self.original = self.weight.detach().clone()

    @torch.no_grad()
    def _project(self, *_: object) -> None:
        """EasyEdit's norm constraint: clamp every element of W to [W0 − c, W0 + c].

        Run as a forward pre-hook of the target module during training, so every forward (and so
        every loss and the early-stop check) sees the projected weight, which is the same as
        EasyEdit's clamp after each optimiser step; once more after training for the last step.
        """
        c = self.config.norm_constraint
        if c is None or self.original is None:
            return
        self.weight.copy_(torch.clamp(self.weight, self.original - c, self.original + c))

    @torch.no_grad()
    def _settle(self) -> None:
        """Fix the stored delta and make the live weight exactly `W0 + delta` (what a reload builds)."""
        self.delta = self.weight.detach() - self.original
        self.weight.copy_(self.original + self.delta)

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        return self.train_weight([(r.prompt, r.target) for r in records], progress)

    def train_weight(self, pairs: list[tuple[str, str]], progress: Progress | None = None, **train: object) -> dict:
        """Train `W` on `pairs` with the shared loop (`train` overrides its config); the ledger's statistics."""
        self._keep_original()
        hook = self.target.register_forward_pre_hook(self._project) if self.config.norm_constraint else None
        self.weight.requires_grad_(True)
        try:
            stats = train_on_pairs(
                self.loaded.model, self.loaded.tokenizer, [self.weight], pairs, self.config.train_config(**train),
                progress=progress,
            )
        finally:
            self.weight.requires_grad_(False)
            self.weight.grad = None
            if hook is not None:
                hook.remove()
        self._project()
        self._settle()
        return {"steps": stats.steps, "loss": stats.loss, "all_correct": stats.all_correct,
                "seconds": stats.seconds}

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        delta = self.delta if self.delta is not None else torch.zeros_like(self.weight)
        config = {"method": self.name, **asdict(self.config), "layer": self.layer, "target_module": self.target_name,
                  "weight_shape": list(self.weight.shape)}
        return config, {DELTA_KEY: delta.detach().cpu().contiguous()}, {}

    @torch.no_grad()
    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        if DELTA_KEY not in tensors:
            raise UserError(f"adapter: no {DELTA_KEY!r} tensor (not an FT-L checkpoint)")
        delta = tensors[DELTA_KEY]
        if tuple(delta.shape) != tuple(self.weight.shape):
            raise UserError(f"adapter: {DELTA_KEY} has shape {tuple(delta.shape)}, {self.target_name}.weight has "
                            f"{tuple(self.weight.shape)}")
        self._keep_original()
        self.delta = delta.to(device=self.weight.device, dtype=self.weight.dtype)
        self.weight.copy_(self.original + self.delta)

    @torch.no_grad()
    def remove(self) -> None:
        if self.original is not None:
            self.weight.copy_(self.original)
        self.original = self.delta = None
