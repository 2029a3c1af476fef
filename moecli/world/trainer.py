"""The knowledge-model trainer: teach a small Llama-architecture LM a list of (prompt, answer) facts.

Why: no model can be downloaded here, so every model moecli edits by default (the fact world) or
benchmarks on (ZsRE, CounterFact knowledge models) is pretrained locally, from scratch, until it
*knows* the facts it will be asked to change. Knowing is measured with the evaluator's own metric
(`moecli.engine.evaluation.answer_token_accuracy`), so "Known" before editing is the number reported here.

How:
- A byte-level BPE tokenizer is trained on the facts' texts (plus any extra texts, e.g. edit
  targets, so they tokenize into few pieces).
- Each fact is trained as exactly `prompt + " " + answer` + EOS, split into prompt and answer
  tokens by `moecli.model.batching.encode_pair`, the same function the evaluator uses. The loss weights
  the answer tokens (and EOS) by 1 and the prompt tokens by `prompt_loss_weight`; with weight 0 the
  LM head only runs on answer positions, which is much cheaper.
- Batches are length-bucketed. AdamW with linear warmup, then cosine decay over `max_epochs`
  (or, with `decay_at` set, a constant rate until the proxy accuracy below reaches `decay_at` and
  a cosine decay over `decay_epochs` after that).
- After every epoch the running (training-time) answer-token accuracy is a cheap proxy; once it
  reaches the target, the real metric runs on every fact, and training stops when every group of
  facts (e.g. every template) reaches `target_accuracy`.
- The engine never prints: progress goes to `progress(stage, done, total)`, per-epoch figures to
  `on_epoch(EpochStats)`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moecli.model.sources import quiet_progress

TRAINER_VERSION = 1

Progress = Callable[[str, int, int], None]


@dataclass
class KnowledgeModelConfig:
    """Model shape and optimisation settings. Part of the cache key of every built model."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 1024  # upper bound; the BPE may stop with fewer tokens
    tie_embeddings: bool = False
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    decay_at: float | None = None  # None: cosine over max_epochs; else decay once the proxy reaches it
    decay_epochs: int = 12  # with decay_at: cosine decay length, in epochs
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 64
    max_epochs: int = 60
    target_accuracy: float = 0.99  # stop once the mean accuracy over all facts reaches this ...
    group_target: float | None = None  # ... and every group reaches this (default: target_accuracy)
    known_keep: float = 0.5  # a fact answered right at its latest pass is replayed with this probability
    prompt_loss_weight: float = 0.0
    seed: int = 0
    num_threads: int = 0  # 0: all the cores torch sees (at most 8)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The settings that change the trained model (not where or how fast it runs): the cache key."""
        d = asdict(self)
        d.pop("num_threads")
        d.pop("device")
        return d


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float  # proxy: mean over facts of the accuracy at their latest training pass
    accuracy: float | None  # the real metric, when it was computed this epoch
    seconds: float
    n_trained: int = 0  # facts trained on this epoch


@dataclass
class TrainResult:
    out_dir: Path
    accuracy: float  # mean answer-token accuracy over every fact
    group_accuracy: dict[str, float]  # per group (template, field, ...)
    epochs: int
    seconds: float
    n_params: int
    n_facts: int
    vocab_size: int
    reached_target: bool
    history: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d



def group_mean(values: Sequence[float], groups: Sequence[str] | None) -> dict[str, float]:
    """Mean of `values` per group label (a single "all" group when `groups` is None)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for i, v in enumerate(values):
        acc[groups[i] if groups else "all"].append(v)
    return {g: sum(v) / len(v) for g, v in acc.items()}


def measure_accuracy(
    model,
    tokenizer,
    facts: Sequence[tuple[str, str]],
    groups: Sequence[str] | None = None,
    batch_size: int = 128,
) -> tuple[float, dict[str, float]]:
    """Overall and per-group answer-token accuracy with the evaluator's metric."""
    from moecli.engine.evaluation import answer_token_accuracy

    was_training = model.training
    model.eval()
    accs = answer_token_accuracy(model, tokenizer, list(facts), batch_size=batch_size)
    if was_training:
        model.train()
    return sum(accs) / max(len(accs), 1), group_mean(accs, groups)


def _encode_facts(tokenizer, facts: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    from moecli.model.batching import encode_pair

    eos = tokenizer.eos_token_id
    out = []
    for prompt, answer in facts:
        enc = encode_pair(tokenizer, prompt, answer)
        out.append((enc.ids + [eos], enc.answer_start))
    return out


def _batches(encoded: list[tuple[list[int], int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled, length-bucketed batches of indices (little padding, random order)."""
    order = torch.randperm(len(encoded), generator=gen).tolist()
    chunk = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(encoded[i][0]))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _collate(encoded, idx: list[int], pad_id: int, prompt_weight: float):
    width = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    # targets[t] is the token predicted at position t (i.e. ids[t + 1]); weight 0 where unused
    targets = torch.zeros((len(idx), width), dtype=torch.long)
    weights = torch.zeros((len(idx), width))
    answer = torch.zeros((len(idx), width), dtype=torch.bool)
    for row, i in enumerate(idx):
        seq, start = encoded[i]
        n = len(seq)
        ids[row, :n] = torch.tensor(seq)
        mask[row, :n] = 1
        targets[row, : n - 1] = ids[row, 1:n]
        if prompt_weight > 0:
            weights[row, : start - 1] = prompt_weight
        weights[row, start - 1 : n - 1] = 1.0
        answer[row, start - 1 : n - 2] = True  # answer tokens proper, not the EOS
    return ids, mask, targets, weights, answer


def _lr_factor(step: int, decay_frac: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps; constant; then cosine decay as `decay_frac` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    frac = min(1.0, max(0.0, decay_frac))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def build_model(config: KnowledgeModelConfig, tokenizer, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=max(128, 1 << math.ceil(math.log2(max(max_len, 2) * 2))),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def train_knowledge_model(
    facts: Sequence[tuple[str, str]],
    out_dir: str | Path,
    config: KnowledgeModelConfig | None = None,
    progress: Progress | None = None,
    *,
    groups: Sequence[str] | None = None,
    extra_texts: Sequence[str] = (),
    repeats: Sequence[int] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    metadata: dict | None = None,
    info_name: str = "knowledge.json",
) -> TrainResult:
    """Train a tokenizer and a small Llama LM on `facts` until it knows them; save it to `out_dir`.

    `groups` (one label per fact) makes the stop rule per group: every group must reach
    `config.target_accuracy`. `extra_texts` only feed the tokenizer. `repeats` (one count per
    fact, default 1) trains a fact that many times per epoch: for facts asked under a single
    template, so they get as many exposures as facts asked under several. The saved directory holds
    config.json, model.safetensors, the tokenizer files and `info_name` (config, accuracy,
    `metadata`). The directory is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-built model where a finished one is expected.
    """
    from moecli.model.tokenizer import train_tokenizer

    config = config or KnowledgeModelConfig()
    facts = [(p, a.strip()) for p, a in facts]
    if not facts:
        raise ValueError("no facts to train on")
    if groups is not None and len(groups) != len(facts):
        raise ValueError("groups must have one label per fact")
    if repeats is not None and (len(repeats) != len(facts) or min(repeats) < 1):
        raise ValueError("repeats must have one count >= 1 per fact")
    out_dir = Path(out_dir)
    t0 = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or max(1, min(os.cpu_count() or 1, 8)))
    try:
        texts = [f"{p} {a}" for p, a in facts] + [t for t in extra_texts if t]
        tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
        encoded = _encode_facts(tokenizer, facts)
        max_len = max(len(s) for s, _ in encoded)

        torch.manual_seed(config.seed)
        device = torch.device(config.device)
        model = build_model(config, tokenizer, max_len).to(device)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(0.9, 0.98),
        )
        gen = torch.Generator().manual_seed(config.seed)
        pad_id = tokenizer.pad_token_id
        head = model.get_output_embeddings()
        n_facts = len(encoded)
        last_acc = torch.zeros(n_facts)  # answer-token accuracy of each fact at its latest pass
        reps = torch.tensor(list(repeats) if repeats is not None else [1] * n_facts, dtype=torch.long)
        history: list[EpochStats] = []
        accuracy, group_acc, reached = 0.0, {}, False
        step = 0
        decay_from: int | None = None  # the epoch at which the learning-rate decay began
        for epoch in range(1, config.max_epochs + 1):
            te = time.time()
            loss_sum, seen = 0.0, 0
            # facts answered right at their latest pass come back only with probability known_keep
            chosen: list[int] = []
            for r in range(int(reps.max())):
                keep = (reps > r) & ((last_acc < 1.0) | (torch.rand(n_facts, generator=gen) < config.known_keep))
                chosen += torch.nonzero(keep).flatten().tolist()
            batches = _batches([encoded[i] for i in chosen], config.batch_size, gen)
            for b, local in enumerate(batches):
                idx = [chosen[i] for i in local]
                ids, mask, targets, weights, answer = _collate(encoded, idx, pad_id, config.prompt_loss_weight)
                ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
                weights, answer = weights.to(device), answer.to(device)
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                sel = weights > 0
                logits = head(hidden[sel])
                tok_loss = torch.nn.functional.cross_entropy(logits.float(), targets[sel], reduction="none")
                w = weights[sel]
                loss = (tok_loss * w).sum() / w.sum()
                if config.decay_at is None:
                    decay_frac = (epoch - 1 + b / len(batches)) / config.max_epochs
                elif decay_from is None:
                    decay_frac = 0.0
                else:
                    decay_frac = (epoch - decay_from + b / len(batches)) / max(1, config.decay_epochs)
                factor = _lr_factor(step, decay_frac, config.warmup_steps, config.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = config.lr * factor
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                with torch.no_grad():
                    rows = torch.nonzero(sel)[:, 0]
                    is_answer = answer[sel].float()
                    right = (logits.argmax(-1) == targets[sel]).float() * is_answer
                    n_right = torch.zeros(len(idx), device=device).index_add_(0, rows, right)
                    n_all = torch.zeros(len(idx), device=device).index_add_(0, rows, is_answer)
                    last_acc[idx] = (n_right / n_all.clamp(min=1)).cpu()
                    loss_sum += float(loss) * len(idx)
                    seen += len(idx)
            train_acc = float(last_acc.mean())
            if config.decay_at is not None and decay_from is None and train_acc >= config.decay_at:
                decay_from = epoch + 1
            measured = None
            if train_acc >= config.target_accuracy or epoch == config.max_epochs:
                accuracy, group_acc = measure_accuracy(model, tokenizer, facts, groups)
                measured = accuracy
                reached = accuracy >= config.target_accuracy and (
                    min(group_acc.values()) >= (config.group_target or config.target_accuracy)
                )
            stats = EpochStats(epoch, loss_sum / max(seen, 1), train_acc, measured, time.time() - te, seen)
            history.append(stats)
            if progress:
                progress("training", epoch, config.max_epochs)
            if on_epoch:
                on_epoch(stats)
            if reached:
                break
        if progress:
            progress("training", config.max_epochs, config.max_epochs)

        model.eval()
        result = TrainResult(
            out_dir=out_dir,
            accuracy=accuracy,
            group_accuracy=group_acc,
            epochs=len(history),
            seconds=round(time.time() - t0, 1),
            n_params=n_params,
            n_facts=len(facts),
            vocab_size=len(tokenizer),
            reached_target=reached,
            history=history,
        )
        _save(model.to("cpu"), tokenizer, out_dir, config, result, metadata or {}, info_name)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _save(
    model, tokenizer, out_dir: Path, config: KnowledgeModelConfig, result: TrainResult, metadata: dict, info_name: str
) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_progress():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    info = {
        "trainer_version": TRAINER_VERSION,
        "config": config.to_dict(),
        "accuracy": round(result.accuracy, 4),
        "group_accuracy": {k: round(v, 4) for k, v in result.group_accuracy.items()},
        "reached_target": result.reached_target,
        "epochs": result.epochs,
        "train_seconds": result.seconds,
        "num_threads": torch.get_num_threads(),
        "n_params": result.n_params,
        "n_facts": result.n_facts,
        "vocab_size": result.vocab_size,
        **metadata,
    }
    (tmp / info_name).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
