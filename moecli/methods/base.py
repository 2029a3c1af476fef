"""The method interface: `EditMethod`, what the engine drives, and `MethodConfig`, the options every method
has. The bypass methods' shared plumbing is `bypass_method`; each method is one file beside these."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from moecli.adapter.training import Progress, TrainConfig
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.model.loading import LoadedModel, default_layer, find_target_module, module_dims
from moecli.routing.context import AnchorContext


def option(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A config field carrying its help (`metadata["help"]`), which `--set help` and the shipped recipes show;
    a mutable default goes in `default_factory=` instead of `default`."""
    if not help:
        raise ValueError("every config option needs a help text")
    return field(default=default, metadata={"help": help}, **kw)


LAYER_FRACTION_HELP = ("depth of the edited layer when `layer` is null: round(fraction · (num_layers − 1)), "
                       "0 the first layer, 1 the last")


def layer_fraction_option(default: float, why: str) -> Any:
    """`layer_fraction` with a method's own default and the reason for it. Its meaning and its range check stay
    `MethodConfig`'s, so a method whose default differs states only the value and why."""
    return option(default, f"{LAYER_FRACTION_HELP}; default {default}: {why}")


@dataclass
class MethodConfig:
    """Options every method has; each field's help is in its metadata (`option`)."""

    layer: int | None = option(None, "decoder layer to edit; null: the one `layer_fraction` gives")
    layer_fraction: float = layer_fraction_option(
        0.85, "[choice] the MoE bypass methods' late layer, which carries a key-routed edit to the output with the "
              "least interference from the rest of the prompt")
    lr: float = option(1e-2, "learning rate of the edit training")
    max_steps: int = option(200, "most optimisation steps per batch")
    weight_decay: float = option(0.0, "weight decay of the trained parameters with AdamW or SGD (0: none; Adam "
                                      "has none)")
    early_stop: bool = option(True, "stop training a batch once every target token is the argmax (and at least "
                                    "stop_prob likely)")
    stop_prob: float = option(0.0, "early stop only once every target token is the argmax with at least this "
                                   "probability (0: the argmax is enough)")
    prefix_cache: bool = option(True, "run the frozen layers below the edited one once per batch (false: every "
                                      "step); the same result, faster")
    eos_target: bool = option(True, "train target + end-of-sequence (end-of-turn with --chat): the edit answers "
                                    "and stops")

    def train_config(self, **over: Any) -> TrainConfig:
        cfg = TrainConfig(lr=self.lr, max_steps=self.max_steps, weight_decay=self.weight_decay,
                          early_stop=self.early_stop, stop_prob=self.stop_prob, prefix_cache=self.prefix_cache,
                          eos_target=self.eos_target)
        for k, v in over.items():
            setattr(cfg, k, v)
        return cfg

    def resolve(self, model: torch.nn.Module, model_fingerprint: dict | None = None,
                batch_size: int | None = None) -> None:
        """Settle what depends on the model or the run (`auto` values) before run.json and the checkpoint
        record it (`model_fingerprint`: the model's, when the caller has it already; `batch_size`: edits
        trained together, when the caller knows it)."""

    def validate(self) -> None:
        """Raise UserError for values out of range (called after recipe + flags are merged)."""
        for f in fields(self):  # `--lr inf`, `lr: .nan`: no comparison below would catch them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number (got {value})")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0 (got {self.lr})")
        if not 0.0 <= self.stop_prob < 1.0:
            raise UserError(f"stop_prob must be a probability in [0, 1) (got {self.stop_prob})")
        if self.max_steps < 1:
            raise UserError(f"max_steps must be ≥ 1 (got {self.max_steps})")
        if not 0.0 <= self.layer_fraction <= 1.0:
            raise UserError(f"layer_fraction must be in [0, 1] (got {self.layer_fraction})")


class EditMethod:
    """The interface the engine drives; one subclass per file in `moecli.methods`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, loaded: LoadedModel, config: MethodConfig, seed: int = 0) -> None:
        self.loaded, self.config, self.seed = loaded, config, seed

    def locate(self) -> torch.nn.Module:
        """Pick the edited layer (the config's `layer`, else its `layer_fraction` of the depth) and return its FFN
        output module, setting `layer`, `target_name`, `d_in` and `d_out` (what every checkpoint records)."""
        layer = self.config.layer
        self.layer = layer if layer is not None else default_layer(self.loaded.model, self.config.layer_fraction)
        self.target_name, target = find_target_module(self.loaded.model, self.layer)
        self.d_in, self.d_out = module_dims(target)
        return target

    def new_context(self) -> AnchorContext:
        """A routing context that skips the tokenizer's BOS and pad tokens when it looks for anchors, and
        does not take a known name inside a longer one (`anchors.continues_name`)."""
        tok = self.loaded.tokenizer
        return AnchorContext(skip_token_ids={t for t in (tok.bos_token_id, tok.pad_token_id) if t is not None},
                             decode=tok.decode)

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        """Edit the model so it answers `records`; returns training statistics for the ledger."""
        raise NotImplementedError

    def expert_of(self, record_index_in_batch: int) -> int | None:
        """Which expert the last batch's record went to (for the ledger), if the method knows."""
        return None

    def routes(self, prompts: list[str]) -> list[int | None]:
        """For each prompt, the index (in the ledger, i.e. edit order) of the edit it reaches, None for
        none; None everywhere when the method cannot tell one edit from another (FT-L, LoRA, GRACE)."""
        return [None] * len(prompts)

    def knows_routes(self) -> bool:
        """Whether `routes` tells edits apart (else a None from it means "unknown", not "no edit")."""
        return False

    def last_routes(self, n: int) -> list[int | None]:
        """The routes (as `routes` gives them) of the `n` rows of the last forward, then forgotten; None for
        every row when the method cannot tell, or nothing was routed since last asked."""
        return [None] * n

    def leaves_unrouted_alone(self) -> bool:
        """Whether an input that `routes` sends to no edit gets exactly the unedited model's output (every
        generated token included), so an evaluation may take the baseline's answers for it unrun."""
        return False

    @classmethod
    def revert_tensors(cls, config: dict, tensors: dict[str, torch.Tensor], ledger: list[dict],
                       rows: list[int]) -> dict[str, torch.Tensor]:
        """The adapter's tensors with the edits at ledger indices `rows` taken back, the others untouched.

        Done on the saved tensors, without the model: taking an edit back must not retrain anything.
        A method whose edits share the weights they changed (FT-L, LoRA) cannot take one back alone.
        """
        raise UserError(f"{cls.name}: its edits share the weights they changed, so one cannot be taken back "
                        "alone; revert works for memoe, lemoe, scen and grace adapters")

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        """(adapter config, tensors, extra files) for the checkpoint."""
        raise NotImplementedError

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Take the method out of the model, leaving the base model exactly as loaded."""
        raise NotImplementedError


def config_from_dict(config_class: type[MethodConfig], values: dict, source: str) -> MethodConfig:
    """Build a config dataclass from a dict, refusing unknown keys with a one-line error."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return config_class(**values)
