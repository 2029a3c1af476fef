"""Learned question keys: which relation a prompt asks about its entity, read from the frozen model.

Why: the key matcher routes an input to an edit when it names the edit's entity *and* asks the same
question. On the fact world the unedited model's answer distribution tells the question; on a real model it
does not, because a rephrasing often starts its answer with another word. A linear map of the last-token
outputs of three middle layers, trained on train-split pairs (rephrasing = the same question, same-subject
probe = another, CounterFact neighbour = the same relation of another subject), separates them. Beside the
layers the map reads the MiniLM sentence embedding of the prompt with its entity blanked (the *skeleton*:
what is asked, whoever it is asked about; at inference decoded around the token span the router found),
because freely worded questions (ZsRE) defeat the layers alone. `--no-text` trains on the layers alone.

`moecli calibrate` trains one per model and sets its threshold on held-out records (`FALSE_MATCH_RATE` of
other questions let through); `query_feature: learned` with `question_encoder: FILE` routes by it, and the
adapter keeps a copy, so it is self-contained. The measurements behind each choice: docs/design.md.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.paths import ASSETS
from moecli.routing.routers import unit_rms

LAYER_FRACTIONS = (0.4, 0.55, 0.7)  # [choice] encoded layers: round(f · (num_layers − 1)); below the bypass's 0.85
HIDDEN = 0  # [choice] width of an optional hidden layer (0: a linear map, which generalises to ZsRE better)
FALSE_MATCH_RATE = 0.0025  # [choice] the threshold lets this share of held-out same-subject probes through
# (Loc ≥ 0.99 in both groups needs well under 1 %)
CURVE_RATES = (0.01, 0.005, 0.0025, 0.001)  # the held-out recall is reported at these rates too


def layer_rms(h: torch.Tensor, n_layers: int, text_dim: int = 0) -> torch.Tensor:
    """Concatenated layer outputs [B, d · n_layers] (then, with `text_dim`, a sentence embedding [B,
    text_dim]), each layer's part and the text part scaled to unit RMS."""
    h = h.float()
    layers = h[:, : h.shape[1] - text_dim]
    out = unit_rms(layers.reshape(len(h), n_layers, -1)).flatten(1)
    return torch.cat([out, unit_rms(h[:, layers.shape[1]:])], 1) if text_dim else out


def project(x: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor | None, b1: torch.Tensor | None) -> torch.Tensor:
    """Unit-norm codes of centred features `x`: one map, or a GELU hidden layer and a map (the encoder's
    forward, shared by training and routing)."""
    if w1 is not None:
        x = F.gelu(x @ w1.t() + b1)
    return F.normalize(x @ weight.t(), dim=-1)


@dataclass
class QuestionEncoder:
    """`encode(h) = normalize(W · act(W1 · (x − mean) + b1))`, x the RMS-normalised outputs of decoder layers
    `layers` at the last prompt token, concatenated, and with `text_dim` > 0 the MiniLM embedding of the
    prompt with its entity blanked (`AnchorContext.skeletons`) after them (`W1`, `b1` absent: a linear
    map); two prompts ask the same question when the cosine of their codes is ≥ `threshold`."""

    layers: tuple[int, ...]
    weight: torch.Tensor  # [k, hidden or d_model · len(layers) + text_dim]
    mean: torch.Tensor  # [d_model · len(layers) + text_dim], centring of the training features
    threshold: float
    info: dict  # how it was trained and what it measured (written into the file)
    w1: torch.Tensor | None = None  # [hidden, d_model · len(layers)]
    b1: torch.Tensor | None = None  # [hidden]
    text_dim: int = 0  # width of the sentence embedding read after the layers (0: none)

    @property
    def layer(self) -> int:
        """The highest layer read: the codes exist once it has run."""
        return max(self.layers)

    @property
    def d_model(self) -> int:
        return (self.mean.shape[0] - self.text_dim) // len(self.layers)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Codes [B, k] of the concatenated layer outputs (and text part) `h` [B, d_model · len(layers) + text_dim]."""
        x = layer_rms(h, len(self.layers), self.text_dim) - self.mean.to(h.device)
        dev = h.device
        return project(x, self.weight.to(dev), None if self.w1 is None else self.w1.to(dev),
                       None if self.b1 is None else self.b1.to(dev))

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}weight": self.weight.contiguous(), f"{prefix}mean": self.mean.contiguous(),
               f"{prefix}layers": torch.tensor(self.layers), f"{prefix}threshold": torch.tensor(self.threshold)}
        if self.w1 is not None:
            out.update({f"{prefix}w1": self.w1.contiguous(), f"{prefix}b1": self.b1.contiguous()})
        if self.text_dim:
            out[f"{prefix}text_dim"] = torch.tensor(self.text_dim)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "", info: dict | None = None):
        layers = (tensors[f"{prefix}layers"].tolist() if f"{prefix}layers" in tensors
                  else [int(tensors[f"{prefix}layer"])])  # files of the one-layer linear encoder
        w1 = tensors.get(f"{prefix}w1")
        return cls(tuple(int(v) for v in layers), tensors[f"{prefix}weight"].float(), tensors[f"{prefix}mean"].float(),
                   float(tensors[f"{prefix}threshold"]), info or {}, None if w1 is None else w1.float(),
                   None if w1 is None else tensors[f"{prefix}b1"].float(),
                   int(tensors.get(f"{prefix}text_dim", torch.tensor(0))))

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
        if d_model is not None and enc.d_model != d_model:
            raise UserError(f"question_encoder {path}: made for a model of width {enc.d_model} "
                            f"({info.get('model', '?')}), this one has {d_model}")
        return enc


QUESTIONS_DIR = "questions"  # under `$MOECLI_CACHE` (`moecli calibrate --install`) and `moecli/assets`


def encoder_dirs() -> list[Path]:
    """Where `find_encoder` looks: the user's cache first, then the encoders moecli ships."""
    from moecli.paths import cache_root

    return [cache_root() / QUESTIONS_DIR, ASSETS / QUESTIONS_DIR]


def encoder_info(path: str | Path) -> dict | None:
    """The metadata `calibrate` wrote into a key file (how it was made, what it measured); None when the file
    cannot be read as one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("moecli", "{}"))
    except (OSError, ValueError, SafetensorError):
        return None


def find_encoder(model: torch.nn.Module, model_fingerprint: dict | None = None) -> Path | None:
    """The calibrated question encoder made for `model` (same fingerprint), if one is installed or shipped;
    one that reads text is passed over for one that does not when MiniLM is not installed.

    Why: `query_feature: auto` (the default) routes by the learned key wherever one exists for the model,
    and by the unedited model's answer otherwise (the only test that needs no calibration)."""

    from moecli.model.loading import fingerprint, fingerprints_match
    from moecli.routing import sentence

    mine = model_fingerprint
    fallback = None
    for folder in encoder_dirs():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            info = encoder_info(path)
            if info is None:
                continue  # a damaged file is not an encoder for anything
            theirs = info.get("fingerprint")
            if isinstance(theirs, dict):
                mine = mine or fingerprint(model)
                if fingerprints_match(theirs, mine):
                    if not info.get("text_dim") or sentence.available():
                        return path
                    # reads text, and MiniLM is not installed: taken only when nothing else is found (routing
                    # by it then says MiniLM is missing, rather than quietly routing by a weaker test)
                    fallback = fallback or path
    return fallback


def default_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({round(f * (num_layers - 1)) for f in LAYER_FRACTIONS}))


class Capture:
    """Forward hooks on decoder layers `layers` keeping their outputs at each row's last prompt token,
    concatenated, in `context.question_hidden` once the highest has run (prompt passes only; a generation
    step keeps the prompt's); with `text`, the MiniLM embeddings of the rows' skeletons after them,
    computed when first read (a forward whose inputs name no edited entity never needs them)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], context, text: bool = False) -> None:
        from moecli.model.loading import decoder_layers

        self.context, self.layers, self.text = context, tuple(layers), text
        self.parts: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def hook(module, args, output) -> None:
            ctx = self.context
            if ctx.continuation or ctx.prompt_last is None:
                return
            h = output[0] if isinstance(output, (tuple, list)) else output
            rows = torch.arange(h.shape[0], device=h.device)
            self.parts[index] = h[rows, ctx.last_index(h.shape[1]).to(h.device)].detach()
            if index == self.layers[-1]:
                hidden = torch.cat([self.parts[i] for i in self.layers], -1)
                ctx.question_hidden = hidden
                if self.text:
                    ctx.pending_question = self._with_text(hidden, ctx)

        return hook

    @staticmethod
    def _with_text(hidden: torch.Tensor, ctx) -> Callable[[], torch.Tensor]:
        """The layers then the skeletons' MiniLM embeddings, decoded when read: the read comes within the
        same forward's context (the next forward's `compute` drops what is still pending)."""
        from moecli.routing.sentence import embed_texts

        def compute() -> torch.Tensor:
            texts = [question_text(t) for t in ctx.skeletons()]
            return torch.cat([hidden, embed_texts(texts, hidden.device).to(hidden)], -1)

        return compute

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- calibration
ESTIMATE_PROMPTS = 256  # prompts run (and timed) before the whole calibration's time is estimated
Pair = tuple[int, int, str]  # (prompt index, prompt index, kind): "rephrase" | "neighbour" | "other"


def calibration_pairs(records: Sequence[EditRecord]) -> tuple[list[str], list[Pair], list[str | None]]:
    """(prompts, pairs, subjects): each record's prompt against its rephrasings, its `neighborhood` prompts
    (the same relation of another subject) and its `same_subject` probes (another question about the
    subject); the subject each prompt names (its record's; a neighbour's is not known: it is not blanked)."""
    prompts: list[str] = []
    pairs: list[Pair] = []
    subjects: list[str | None] = []
    for r in records:
        anchor = len(prompts)
        prompts.append(r.prompt)
        others = [(q, "rephrase") for q in r.rephrases] + [
            (lp.prompt, "neighbour" if lp.group == "neighborhood" else "other")
            for lp in r.locality if lp.group in ("neighborhood", "same_subject")]
        subjects.append(r.subject)
        for text, kind in others:
            pairs.append((anchor, len(prompts), kind))
            prompts.append(text)
            subjects.append(None if kind == "neighbour" else r.subject)
    return prompts, pairs, subjects


def text_features(prompts: Sequence[str], subjects: Sequence[str | None], device: torch.device | str = "cpu",
                  progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """MiniLM embeddings [N, 384] of `prompts` with their subjects blanked (`locality.skeleton`, then
    `question_text`; the whole prompt where it does not name its subject): the text part an encoder with
    `text_dim` reads."""
    from moecli.data.probes import skeleton
    from moecli.routing.sentence import embed_texts

    return embed_texts([question_text((skeleton(p, s) if s else None) or p) for p, s in zip(prompts, subjects)],
                       device, progress=progress)


def question_text(skeleton: str) -> str:
    """What MiniLM reads of a skeleton: the blank dropped and whitespace collapsed, so that the text decoded
    around the router's token span ("of" + BLANK + " is") and the string calibration blanked ("of " + BLANK
    + " is") are one text (MiniLM's tokenizer drops the NUL blank and splits on spaces anyway)."""
    from moecli.data.probes import BLANK

    return " ".join(skeleton.replace(BLANK, " ").split())


def train_encoder(features: torch.Tensor, pairs: list[Pair], held_out: set[int], dim: int = 128, hidden: int = 0,
                  n_layers: int = 1, steps: int = 300, lr: float = 1e-3, seed: int = 0,
                  text_dim: int = 0, false_match_rate: float = FALSE_MATCH_RATE,
                  groups: dict[int, str] | None = None) -> tuple[dict, dict]:
    """Fit the encoder on the pairs whose anchor is not in `held_out` (logistic loss on 10·(cos − 0.5):
    rephrasings and neighbours 1, other questions 0); on the held-out ones measure rephrasing vs other
    question and set the threshold that lets `false_match_rate` of the other questions through (the
    rephrasings that pass at each of `CURVE_RATES` are reported beside it, to choose the rate by).
    `features` [N, d_model · n_layers + text_dim]. `groups`: a name per anchor (the file it came from):
    the held-out measures at the pooled threshold are also reported per name (`per_source`).
    Returns (tensors: weight, mean, w1, b1; metrics)."""
    g = torch.Generator().manual_seed(seed)
    x = layer_rms(features, n_layers, text_dim)
    fit = [p for p in pairs if p[0] not in held_out]
    test = [p for p in pairs if p[0] in held_out]
    mean = x[sorted({i for p in fit for i in p[:2]})].mean(0)
    xc = x - mean
    width = hidden or x.shape[1]
    params = {"weight": torch.randn(dim, width, generator=g) / width ** 0.5}
    if hidden:
        params.update({"w1": torch.randn(hidden, x.shape[1], generator=g) / x.shape[1] ** 0.5,
                       "b1": torch.zeros(hidden)})
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)

    def codes() -> torch.Tensor:
        return project(xc, params["weight"], params.get("w1"), params.get("b1"))

    a, b = torch.tensor([p[0] for p in fit]), torch.tensor([p[1] for p in fit])
    y = torch.tensor([0.0 if p[2] == "other" else 1.0 for p in fit])
    for _ in range(steps):
        z = codes()
        loss = F.binary_cross_entropy_with_logits(10.0 * ((z[a] * z[b]).sum(-1) - 0.5), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = codes()

    def cosines(kind: str, group: str | None = None) -> torch.Tensor:
        ps = [p for p in test if p[2] == kind and (group is None or groups.get(p[0]) == group)]
        return (z[[p[0] for p in ps]] * z[[p[1] for p in ps]]).sum(-1) if ps else torch.zeros(0)

    same, other = cosines("rephrase"), cosines("other")
    metrics: dict = {"fit_pairs": len(fit), "held_out_pairs": len(test), "threshold": 0.5}
    if len(same) and len(other):
        def passing(rate: float) -> tuple[float, float]:  # the threshold at `rate`, the rephrasings it passes
            threshold = float(torch.quantile(other, 1.0 - rate))
            return threshold, float((same >= threshold).float().mean())

        threshold, recall = passing(false_match_rate)
        metrics.update({"recall_at_rate": {str(r): passing(r)[1] for r in CURVE_RATES},
                        "auc": float((same.unsqueeze(1) > other.unsqueeze(0)).float().mean()),
                        "threshold": threshold, "recall_at_threshold": recall,
                        "false_match_rate": float((other >= threshold).float().mean())})
        per_source = {}
        for name in sorted(set((groups or {}).values())):
            mine, theirs = cosines("rephrase", name), cosines("other", name)
            if len(mine) and len(theirs):
                per_source[name] = {"recall_at_threshold": float((mine >= threshold).float().mean()),
                                    "false_match_rate": float((theirs >= threshold).float().mean()),
                                    "auc": float((mine.unsqueeze(1) > theirs.unsqueeze(0)).float().mean()),
                                    "rephrasings": len(mine), "others": len(theirs)}
        if per_source:
            metrics["per_source"] = per_source
    return {k: v.detach() for k, v in params.items()} | {"mean": mean}, metrics


@torch.no_grad()
def layer_features(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 64,
                   progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """The outputs of decoder layers `layers` at each prompt's last token, concatenated [N, d_model ·
    len(layers)], prompts run in chunks of similar length; the layers above the highest are not run."""
    from moecli.model.batching import collate, length_groups, pad_id_of, prompt_only
    from moecli.model.loading import decoder_layers, outputs_until

    items = [prompt_only(tokenizer, p) for p in prompts]
    groups = length_groups(items, batch_size)
    d = model.get_input_embeddings().weight.shape[1]
    out = torch.zeros(len(items), d * len(layers))
    blocks = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    for done, idx in enumerate(groups, 1):
        batch = collate([items[i] for i in idx], pad_id_of(tokenizer)).to(device)
        grabbed = outputs_until(lambda b=batch: model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                      use_cache=False), {i: blocks[i] for i in layers})
        last = torch.tensor([n - 1 for n in batch.prompt_lengths], device=device)
        rows = torch.arange(len(idx), device=device)
        out[torch.tensor(idx)] = torch.cat([grabbed[i][rows, last] for i in layers], -1).float().cpu()
        if progress:
            progress("features", done, len(groups))
    return out


def training_seconds(n: int, width: int, dim: int, steps: int = 300) -> float:
    """About how long `train_encoder` takes on `n` prompts of `width` features: each step is one product of
    the features with the map forward and two backward (x @ W.T of [n, width] by [width, dim], timed once)."""
    import time

    x, w = torch.randn(n, width), torch.randn(dim, width)
    t0 = time.perf_counter()
    x @ w.t()
    return 3 * steps * (time.perf_counter() - t0)


def timed_features(loaded, prompts: Sequence[str], subjects: Sequence[str | None], layers: Sequence[int],
                   text: bool, progress: Callable[[str, int, int], None] | None = None,
                   estimate: Callable[[float, int], None] | None = None) -> torch.Tensor:
    """The layer features (and with `text` the skeletons' MiniLM embeddings after them) of `prompts`; with
    `estimate`, the first `ESTIMATE_PROMPTS` (a strided sample: all lengths) are run first and timed, and
    `estimate(expected seconds of all, number of prompts)` is called before the rest."""
    import time

    n = len(prompts)
    first = list(range(0, n, max(1, n // ESTIMATE_PROMPTS)))[:ESTIMATE_PROMPTS] if estimate and n else []
    rest = sorted(set(range(n)) - set(first))

    def run(idx: list[int], report) -> torch.Tensor:
        part = layer_features(loaded.model, loaded.tokenizer, [prompts[i] for i in idx], layers, progress=report)
        if text:
            part = torch.cat([part, text_features([prompts[i] for i in idx], [subjects[i] for i in idx],
                                                  loaded.device, progress=report)], 1)
        return part

    pieces = []
    if first:
        t0 = time.perf_counter()
        pieces.append((first, run(first, None)))
        estimate((time.perf_counter() - t0) * n / len(first), n)
    if rest:
        pieces.append((rest, run(rest, progress)))
    out = torch.zeros(n, pieces[0][1].shape[1]) if pieces else torch.zeros(0, 0)
    for idx, part in pieces:
        out[torch.tensor(idx)] = part
    return out


MIN_HELD_OUT = 100
"""Held-out edits below which calibrate warns: its threshold lets through 0.25 % of other questions, a rate
that a few hundred held-out pairs cannot measure (4 records gave AUC 1.000)."""


def calibrate(loaded, records: Sequence[EditRecord], layers: Sequence[int] | None = None, dim: int = 128,
              hidden: int = HIDDEN, held_out_share: float = 0.2, seed: int = 0, sources: Sequence[str] = (),
              progress: Callable[[str, int, int], None] | None = None, text: bool = True,
              false_match_rate: float = FALSE_MATCH_RATE, groups: Sequence[str] | None = None,
              estimate: Callable[[float, int], None] | None = None) -> QuestionEncoder:
    """Train and calibrate a question encoder for `loaded`'s model on train-split `records` (which carry
    rephrasings and `same_subject` probes; see `moecli.data.probes.with_same_subject`); with `text` it reads
    the MiniLM embedding of each prompt's skeleton beside the layers (needs the `embed` extra). `groups`:
    the file each record came from (held-out measures per file, `per_source`). `estimate(seconds, prompts)`
    is called once the first `ESTIMATE_PROMPTS` prompts have run, with the expected time of the whole."""
    from moecli.model.loading import fingerprint, num_layers
    from moecli.routing import sentence

    n_layers = num_layers(loaded.model)
    layers = default_layers(n_layers) if not layers else tuple(sorted(set(layers)))
    if not all(0 <= v < n_layers for v in layers):
        raise UserError(f"--layer {','.join(map(str, layers))}: the model has decoder layers 0–{n_layers - 1}")
    if text and not sentence.available():
        raise UserError(f"calibrate {sentence.MISSING}; --no-text trains one on the model's layers alone")
    prompts, pairs, subjects = calibration_pairs(records)
    kinds = {p[2] for p in pairs}
    if "other" not in kinds or "rephrase" not in kinds:
        raise UserError("calibrate: the records need rephrasings and same-subject probes (records with subjects)")
    anchors = sorted({p[0] for p in pairs})
    held = set(random.Random(seed).sample(anchors, max(1, int(held_out_share * len(anchors)))))
    text_dim = sentence.DIM if text else 0
    d_model = loaded.model.get_input_embeddings().weight.shape[1]

    def with_training(seconds: float, n: int) -> None:  # the features' time, and the fit's (timed on its shape)
        estimate(seconds + training_seconds(n, d_model * len(layers) + text_dim, hidden or dim), n)

    features = timed_features(loaded, prompts, subjects, layers, text, progress, estimate and with_training)
    group_of = None
    if groups is not None:
        owner = [i for i, r in enumerate(records) for _ in range(1 + len(r.rephrases) + sum(
            lp.group in ("neighborhood", "same_subject") for lp in r.locality))]
        group_of = {a: groups[owner[a]] for a in anchors}
    fitted, metrics = train_encoder(features, pairs, held, dim=dim, hidden=hidden, n_layers=len(layers), seed=seed,
                                    text_dim=text_dim, false_match_rate=false_match_rate, groups=group_of)
    info = {"model": Path(loaded.path).name, "fingerprint": fingerprint(loaded.model), "family": loaded.family,
            "layers": list(layers), "num_layers": n_layers,
            "dim": dim, "hidden": hidden, "text_dim": text_dim, "records": len(records), "prompts": len(prompts),
            "sources": list(sources), "held_out_edits": len(held), **metrics}
    if len(held) < MIN_HELD_OUT:
        info["warning"] = (f"only {len(held)} held-out edit{'s' * (len(held) != 1)} ({len(records)} records): "
                           "the AUC, recall and threshold measured on them are noise; calibrate on "
                           f"{math.ceil(MIN_HELD_OUT / held_out_share)} records or more")
    return QuestionEncoder(layers, fitted["weight"], fitted["mean"], float(metrics["threshold"]), info,
                           fitted.get("w1"), fitted.get("b1"), text_dim)
