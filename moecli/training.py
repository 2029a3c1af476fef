"""The one edit-training loop every method uses.

Masked cross-entropy on the target tokens only (prompt tokens labelled −100), AdamW, an early stop
once every target token of the batch is the argmax, and a max-steps bound. Optionally a *retain*
term: KL divergence to the unedited model's next-token distributions on given prompts, so that the
bypass learns where not to act. Methods differ only in which parameters they hand to this loop
and which extra loss (e.g. a router's load-balancing term) they add.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moecli.batching import (
    Batch,
    collate,
    encode_pair,
    forward,
    masked_ce,
    pad_id_of,
    prompt_only,
    shifted_predictions,
)

Progress = Callable[[str, int, int], None]


@dataclass
class TrainConfig:
    """Hyper-parameters of the edit-training loop."""

    lr: float = 1e-3
    max_steps: int = 100
    weight_decay: float = 0.0
    early_stop: bool = True
    micro_batch: int = 64
    retain_weight: float = 1.0
    optimizer: str = "adamw"


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
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_on_pairs(
    model, tokenizer, params: list[torch.nn.Parameter], pairs: Sequence[tuple[str, str]], cfg: TrainConfig, *,
    extra_loss: Callable[[], torch.Tensor | None] | None = None, retain: RetainSet | None = None,
    train_modules: Sequence[torch.nn.Module] = (), progress: Progress | None = None, stage: str = "training",
) -> TrainStats:
    """Train `params` so that `model` answers each (prompt, target) pair; everything else frozen.

    The base model stays in eval mode (no dropout: the frozen network must behave as at
    inference); only `train_modules` (e.g. a noisy router) are put in training mode. An early stop
    is confirmed by an eval-mode pass, so "all targets right" holds for the model as it will be used.
    """
    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)
    encoded = [encode_pair(tokenizer, p, a) for p, a in pairs]
    batches = [
        collate(encoded[i : i + cfg.micro_batch], pad).to(device) for i in range(0, len(encoded), cfg.micro_batch)
    ]
    opt = make_optimizer(params, cfg)
    modes = [m.training for m in train_modules]
    for m in train_modules:
        m.train()
    loss_value, all_correct, step = float("nan"), False, 0
    try:
        for step in range(1, cfg.max_steps + 1):
            opt.zero_grad(set_to_none=True)
            correct, total_loss = True, 0.0
            for batch in batches:
                logits = forward(model, batch)
                loss = masked_ce(logits, batch.labels) * (len(batch.input_ids) / len(encoded))
                extra = extra_loss() if extra_loss else None
                if extra is not None:
                    loss = loss + extra
                preds, mask = shifted_predictions(logits.detach(), batch.labels)
                correct &= bool((preds[mask] == batch.labels[mask]).all())
                if loss.requires_grad:  # no trainable part on the path (nothing routed): nothing to learn here
                    loss.backward()
                total_loss += float(loss.detach())
            if retain is not None and cfg.retain_weight > 0:
                rl = retain_loss(model, retain) * cfg.retain_weight
                if rl.requires_grad:
                    rl.backward()
                total_loss += float(rl.detach())
            loss_value = total_loss
            if progress:
                progress(stage, step, cfg.max_steps)
            if correct and cfg.early_stop and _all_correct_eval(model, batches, train_modules):
                all_correct = True
                break
            opt.step()
    finally:
        for m, mode in zip(train_modules, modes):
            m.train(mode)
    if progress:
        progress(stage, cfg.max_steps, cfg.max_steps)
    return TrainStats(steps=step, loss=loss_value, all_correct=all_correct, seconds=time.perf_counter() - t0)


@torch.no_grad()
def _all_correct_eval(model, batches: list[Batch], train_modules: Sequence[torch.nn.Module]) -> bool:
    """Whether every target token is the argmax with the trainable modules in eval mode."""
    for m in train_modules:
        m.eval()
    try:
        for batch in batches:
            logits = forward(model, batch)
            preds, mask = shifted_predictions(logits, batch.labels)
            if not bool((preds[mask] == batch.labels[mask]).all()):
                return False
        return True
    finally:
        for m in train_modules:
            m.train()


def retain_loss(model, retain: RetainSet) -> torch.Tensor:
    """KL(base ‖ edited) over every non-pad position of the retain prompts."""
    batch = retain.batch
    logits = forward(model, batch).float()
    kl = F.kl_div(logits.log_softmax(-1), retain.log_probs, log_target=True, reduction="none").sum(-1)
    mask = batch.attention_mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1)
