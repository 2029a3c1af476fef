"""Learned question keys: which relation a prompt asks about its entity, read from the frozen model.

Why: the key matcher routes an input to an edit when it names the edit's entity *and* asks the same
question. On the fact world the unedited model's answer distribution tells the question (balanced
accuracy 0.985); on a real model it does not: a rephrasing often starts its answer with another word
(SmolLM2, 150 `counterfact_train` records: rephrasing vs the same subject asked another relation, AUC
0.59 for the answer distribution, 0.70 for the best layer's last-token hidden state). A linear map of
one layer's last-token hidden state, trained on train-split pairs (rephrasing = the same question,
same-subject probe = another, CounterFact neighbour = the same relation of another subject), separates
them (AUC 0.98 on held-out records). `moecli calibrate` trains one per model and calibrates its
threshold; `query_feature: learned` with `question_encoder: FILE` routes by it, and the adapter keeps a
copy, so it is self-contained.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moecli.errors import UserError
from moecli.records import EditRecord
from moecli.routing import unit_rms

LAYER_FRACTION = 0.55  # [choice] the encoded layer: round(fraction · (num_layers − 1)); below the bypass's 0.85
FALSE_MATCH_RATE = 0.01  # [choice] the threshold lets this share of held-out same-subject probes through


@dataclass
class QuestionEncoder:
    """`encode(h) = normalize(W · (rms(h) − mean))` of the output of decoder layer `layer` at the last
    prompt token; two prompts ask the same question when the cosine of their codes is ≥ `threshold`."""

    layer: int
    weight: torch.Tensor  # [k, d_model]
    mean: torch.Tensor  # [d_model], centring of the training features
    threshold: float
    info: dict  # how it was trained and what it measured (written into the file)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        h = unit_rms(h.float())
        return F.normalize((h - self.mean.to(h.device)) @ self.weight.to(h.device).t(), dim=-1)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}weight": self.weight.contiguous(), f"{prefix}mean": self.mean.contiguous(),
                f"{prefix}layer": torch.tensor(self.layer), f"{prefix}threshold": torch.tensor(self.threshold)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "", info: dict | None = None):
        return cls(int(tensors[f"{prefix}layer"]), tensors[f"{prefix}weight"].float(),
                   tensors[f"{prefix}mean"].float(), float(tensors[f"{prefix}threshold"]), info or {})

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        from moecli.fsutil import atomic_write_bytes

        atomic_write_bytes(path, save(self.tensors(), metadata={"moecli": json.dumps(self.info)}))

    @classmethod
    def load(cls, path: str | Path, d_model: int | None = None) -> QuestionEncoder:
        """Read a file `moecli calibrate` wrote; a missing, damaged or foreign one is a one-line UserError."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"question_encoder {path}: no such file (make one with `moecli calibrate`)")
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                info = json.loads((f.metadata() or {}).get("moecli", "{}"))
            enc = cls.from_tensors(tensors, info=info)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise UserError(f"question_encoder {path}: not a moecli question encoder ({exc})") from None
        if d_model is not None and enc.weight.shape[1] != d_model:
            raise UserError(f"question_encoder {path}: made for a model of width {enc.weight.shape[1]} "
                            f"({info.get('model', '?')}), this one has {d_model}")
        return enc


def default_layer(num_layers: int) -> int:
    return round(LAYER_FRACTION * (num_layers - 1))


class Capture:
    """A forward hook on one decoder layer keeping its output at each row's last prompt token in
    `context.question_hidden` (prompt passes only; a generation step keeps the prompt's)."""

    def __init__(self, layer_module: torch.nn.Module, context) -> None:
        self.context = context
        self.handle = layer_module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        ctx = self.context
        if ctx.continuation or ctx.prompt_last is None:
            return
        h = output[0] if isinstance(output, (tuple, list)) else output
        rows = torch.arange(h.shape[0], device=h.device)
        ctx.question_hidden = h[rows, ctx.last_index(h.shape[1]).to(h.device)].detach()

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------- calibration
Pair = tuple[int, int, str]  # (prompt index, prompt index, kind): "rephrase" | "neighbour" | "other"


def calibration_pairs(records: Sequence[EditRecord]) -> tuple[list[str], list[Pair]]:
    """(prompts, pairs): each record's prompt against its rephrasings, its `neighborhood` prompts (the same
    relation of another subject) and its `same_subject` probes (another question about the subject)."""
    prompts: list[str] = []
    pairs: list[Pair] = []
    for r in records:
        anchor = len(prompts)
        prompts.append(r.prompt)
        others = [(q, "rephrase") for q in r.rephrases] + [
            (lp.prompt, "neighbour" if lp.group == "neighborhood" else "other")
            for lp in r.locality if lp.group in ("neighborhood", "same_subject")]
        for text, kind in others:
            pairs.append((anchor, len(prompts), kind))
            prompts.append(text)
    return prompts, pairs


def train_encoder(features: torch.Tensor, pairs: list[Pair], held_out: set[int], dim: int = 128,
                  steps: int = 300, lr: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit W on the pairs whose anchor is not in `held_out` (logistic loss on 10·(cos − 0.5): rephrasings and
    neighbours 1, other questions 0); on the held-out ones measure rephrasing vs other question and set the
    threshold that lets `FALSE_MATCH_RATE` of the other questions through. Returns (weight, mean, metrics)."""
    g = torch.Generator().manual_seed(seed)
    x = unit_rms(features.float())
    fit = [p for p in pairs if p[0] not in held_out]
    test = [p for p in pairs if p[0] in held_out]
    mean = x[sorted({i for p in fit for i in p[:2]})].mean(0)
    xc = x - mean
    weight = (torch.randn(dim, x.shape[1], generator=g) / x.shape[1] ** 0.5).requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    a, b = torch.tensor([p[0] for p in fit]), torch.tensor([p[1] for p in fit])
    y = torch.tensor([0.0 if p[2] == "other" else 1.0 for p in fit])
    for _ in range(steps):
        z = F.normalize(xc @ weight.t(), dim=-1)
        loss = F.binary_cross_entropy_with_logits(10.0 * ((z[a] * z[b]).sum(-1) - 0.5), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight = weight.detach()
    z = F.normalize(xc @ weight.t(), dim=-1)

    def cosines(kind: str) -> torch.Tensor:
        ps = [p for p in test if p[2] == kind]
        return (z[[p[0] for p in ps]] * z[[p[1] for p in ps]]).sum(-1) if ps else torch.zeros(0)

    same, other = cosines("rephrase"), cosines("other")
    metrics: dict = {"fit_pairs": len(fit), "held_out_pairs": len(test), "threshold": 0.5}
    if len(same) and len(other):
        threshold = float(torch.quantile(other, 1.0 - FALSE_MATCH_RATE))
        metrics.update({"auc": float((same.unsqueeze(1) > other.unsqueeze(0)).float().mean()),
                        "threshold": threshold, "recall_at_threshold": float((same >= threshold).float().mean()),
                        "false_match_rate": float((other >= threshold).float().mean())})
    return weight, mean, metrics


@torch.no_grad()
def layer_features(model, tokenizer, prompts: Sequence[str], layer: int, batch_size: int = 64,
                   progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """The output of decoder layer `layer` at each prompt's last token [N, d_model], prompts run in chunks
    of similar length; the layers above are not run."""
    from moecli.batching import collate, length_groups, pad_id_of, prompt_only
    from moecli.modeling import decoder_layers

    items = [prompt_only(tokenizer, p) for p in prompts]
    groups = length_groups(items, batch_size)
    out = torch.zeros(len(items), model.get_input_embeddings().weight.shape[1])
    grabbed: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def hook(module, args, output):
        grabbed.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    device = model.get_input_embeddings().weight.device
    try:
        for done, idx in enumerate(groups, 1):
            batch = collate([items[i] for i in idx], pad_id_of(tokenizer)).to(device)
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except _Stop:
                pass
            h = grabbed.pop()
            last = torch.tensor([n - 1 for n in batch.prompt_lengths], device=h.device)
            out[torch.tensor(idx)] = h[torch.arange(len(idx), device=h.device), last].float().cpu()
            if progress:
                progress("features", done, len(groups))
    finally:
        handle.remove()
    return out


def calibrate(loaded, records: Sequence[EditRecord], layer: int | None = None, dim: int = 128,
              held_out_share: float = 0.2, seed: int = 0, sources: Sequence[str] = (),
              progress: Callable[[str, int, int], None] | None = None) -> QuestionEncoder:
    """Train and calibrate a question encoder for `loaded`'s model on train-split `records` (which carry
    rephrasings and `same_subject` probes; see `moecli.locality.with_same_subject`)."""
    from moecli.modeling import num_layers

    n_layers = num_layers(loaded.model)
    layer = default_layer(n_layers) if layer is None else layer
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer}: the model has decoder layers 0–{n_layers - 1}")
    prompts, pairs = calibration_pairs(records)
    kinds = {p[2] for p in pairs}
    if "other" not in kinds or "rephrase" not in kinds:
        raise UserError("calibrate: the records need rephrasings and same-subject probes (records with subjects)")
    anchors = sorted({p[0] for p in pairs})
    held = set(random.Random(seed).sample(anchors, max(1, int(held_out_share * len(anchors)))))
    features = layer_features(loaded.model, loaded.tokenizer, prompts, layer, progress=progress)
    weight, mean, metrics = train_encoder(features, pairs, held, dim=dim, seed=seed)
    info = {"model": str(loaded.path), "family": loaded.family, "layer": layer, "num_layers": n_layers,
            "dim": dim, "records": len(records), "prompts": len(prompts), "sources": list(sources), **metrics}
    return QuestionEncoder(layer, weight, mean, float(metrics["threshold"]), info)
