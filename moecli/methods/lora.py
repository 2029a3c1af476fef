"""LoRA baseline: one PEFT LoRA adapter on the target module, trained batch after batch.

The adapter comes from `peft` (moecli does not re-implement LoRA): `LoraConfig` aimed at exactly
one module by its qualified name, so it sits where the MoE methods put their bypass and the
comparison is about routing, not placement. transformers' GPT-2 `Conv1D` stores its weight
transposed, which peft handles with `fan_in_fan_out=True`.

Why `LoraModel` and not `inject_adapter_in_model`: the latter is exactly `LoraModel(...).model`
but throws the tuner away, and the tuner's `unload()` is what puts the original module object
back (and deletes the `peft_config` attribute peft sets on the model), so `remove()` leaves the
base model bit-identical with the same state-dict names and fingerprint.

While the adapter is in, the target's qualified name is unchanged (peft wraps the module in place),
so `find_target_module` still finds it (the wrapper, whose `base_layer` is the original); the
model's fingerprint differs (state-dict names gain `base_layer`/`lora_`), as for every wrapped model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import EditMethod, MethodConfig, layer_fraction_option, option
from moecli.model.loading import LoadedModel

ADAPTER = "moecli"  # peft adapter name; not part of the exported tensor names


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA options; defaults are EasyEdit's `hparams/LoRA/llama-7b.yaml` unless marked [choice]."""

    layer: int | None = option(None, "decoder layer whose FFN output module gets the adapter; null: the one "
                                     "`layer_fraction` gives")
    layer_fraction: float = layer_fraction_option(0.56, "[choice] LEMoE's depth (index 17 of LLaMA2-7B's 0..31)")
    lr: float = option(5e-3, "[EasyEdit] learning rate")
    max_steps: int = option(70, "[EasyEdit num_steps] optimisation steps per batch")
    weight_decay: float = option(0.0, "[EasyEdit] AdamW weight decay")
    early_stop: bool = option(True, "[choice] stop once every target token is the argmax (the shared loop)")
    rank: int = option(8, "[EasyEdit] LoRA rank r")
    alpha: float = option(32.0, "[EasyEdit lora_alpha] the update is scaled by alpha / rank")
    # [choice] lora_dropout is fixed at 0 (EasyEdit: 0.1): the frozen model runs in eval mode during
    # editing, and a deterministic adapter is what makes checkpoints reproduce metrics exactly.

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise UserError(f"rank must be ≥ 1 (got {self.rank})")
        if self.alpha <= 0:
            raise UserError(f"alpha must be > 0 (got {self.alpha})")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")


class LoRA(EditMethod):
    """A peft LoRA on the target module; lifelong editing keeps training the same adapter."""

    name = "lora"
    config_class = LoRAConfig
    config: LoRAConfig

    def __init__(self, loaded: LoadedModel, config: LoRAConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        model = loaded.model
        target = self.locate()
        peft_config = PeftLoraConfig(
            r=config.rank, lora_alpha=config.alpha, target_modules=[self.target_name], lora_dropout=0.0,
            bias="none", fan_in_fan_out=isinstance(target, Conv1D),
        )
        # lora_A is drawn from torch's global generator: seed it here so the same seed gives the
        # same adapter however much randomness ran before, without disturbing anyone else's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tuner: LoraModel | None = LoraModel(model, peft_config, ADAPTER)
        # Train in float32 even on a bf16/fp16 model (what get_peft_model does by default).
        self.tuner._cast_adapter_dtype(ADAPTER, autocast_adapter_dtype=True)
        self._freeze()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.loaded.model.named_parameters() if "lora_" in n and f".{ADAPTER}." in n]

    def _freeze(self) -> None:
        for p in self._params():
            p.requires_grad_(False)
            p.grad = None

    def _check_live(self) -> None:
        if self.tuner is None:
            raise RuntimeError("LoRA adapter was removed from the model")

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        self._check_live()
        params = self._params()
        for p in params:
            p.requires_grad_(True)
        try:
            stats = train_on_pairs(
                self.loaded.model, self.loaded.tokenizer, params, [(r.prompt, r.target) for r in records],
                self.config.train_config(), progress=progress,
            )
        finally:
            self._freeze()
        return {"steps": stats.steps, "loss": stats.loss, "all_correct": stats.all_correct,
                "seconds": stats.seconds}

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        self._check_live()
        state = get_peft_model_state_dict(self.loaded.model, adapter_name=ADAPTER)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        config = {"method": self.name, **asdict(self.config), "layer": self.layer, "target_module": self.target_name,
                  "d_in": self.d_in, "d_out": self.d_out}
        return config, tensors, {}

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        self._check_live()
        expected = set(get_peft_model_state_dict(self.loaded.model, adapter_name=ADAPTER))
        if set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise UserError(f"adapter tensors do not match lora: missing {missing[:3]}, unexpected {unexpected[:3]}")
        try:
            set_peft_model_state_dict(self.loaded.model, dict(tensors), adapter_name=ADAPTER)
        except RuntimeError as exc:  # shape mismatch: another rank or module size
            raise UserError(f"adapter tensors do not fit lora: {' '.join(str(exc).split())[:200]}") from None
        self._freeze()

    def remove(self) -> None:
        if self.tuner is not None:
            self.tuner.unload()
            self.tuner = None
