"""The bypass plumbing MEMoE, LEMoE and SCEN share: everything a Mixture-of-Experts bypass method needs
besides its router and its training schedule. Picking the layer, injecting the bypass, keeping the anchor
trie and the exact edit prompts, the question key, building retain prompts, and exporting/restoring state.
The baselines (FT-L, LoRA, GRACE, WISE, LocFT-BF) do not import it."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moecli.adapter.augment import MAX_PREFIXES, context_prefixes
from moecli.adapter.bypass import (
    EXPERT_FORMS,
    BypassOptions,
    Injection,
    MoEBypass,
    bypass_disabled,
    signature_of,
)
from moecli.adapter.training import RetainSet, TrainConfig
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import EditMethod, MethodConfig, option
from moecli.model.batching import collate, encode_pair, forward, length_groups, logits_at, pad_id_of, prompt_only
from moecli.model.loading import LoadedModel
from moecli.routing.anchors import AnchorTrie, prompt_hash
from moecli.routing.keys import QUERY_FEATURES, VECTOR_FEATURES, KeyMatcher
from moecli.routing.question import Capture, QuestionEncoder, find_encoder


@dataclass
class BypassConfig(MethodConfig):
    """Options of the MoE-bypass methods (MEMoE, LEMoE, SCEN)."""

    stop_prob: float = option(0.9, "[choice] train until every target token has at least this probability, not "
                                   "just the argmax: a rephrasing routed to the edit gets the same expert output in "
                                   "another context and needs the margin")
    expert_form: str = option("lowrank", "dense (a full d_out × d_in delta per expert, as the papers) | lowrank "
                                         "(B·A, so that thousands of experts stay cheap)")
    rank: int = option(16, "rank of the low-rank experts")
    scale: float = option(1.0, "λ in h = W0 x + λ Σ g_i E_i(x)")
    retain: str = option("none", "none | swap: also keep the base model's outputs on subject-swapped prompts "
                                 "(other edits' questions put on this edit's entity)")
    retain_per_edit: int = option(2, "retain: swap: swapped prompts per edit")
    retain_weight: float = option(1.0, "retain: swap: weight of the loss that keeps their outputs")
    context_prefixes: int = option(0, "[choice] copies of each edit prompt behind a random prefix the unedited "
                                      "model writes (ROME's context templates), trained beside the prompt so that "
                                      "the edit holds in other contexts, as a rephrasing reaching it needs; 0: none")
    positions: str = option("answer", "all | answer: edit every position, or only the last prompt token onwards "
                                      "(the entity's own tokens keep their representation)")
    key_substitution: bool = option(True, "[choice] a matched input's last prompt token uses the edit's own input, "
                                          "so a rephrasing gets the push the edit prompt was trained with")
    scope_negatives: int | None = option(
        None, "[choice] other question forms put on each edit's entity, kept apart from it; null: 16, and 0 with "
              "query_feature learned (its threshold is calibrated on such probes, and raising it above other "
              "wordings of the edit's own relation turns rephrasings away)")
    scope_margin: float = option(0.05, "an edit's question threshold ends this far above the most similar of its "
                                       "scope negatives")
    anchor_threshold: float = option(0.95, "key matcher: anchor cosine that counts as the same entity")
    query_threshold: float = option(0.5, "key matcher: question similarity that counts as the same question (-1: "
                                         "entity only)")
    query_feature: str = option(
        "auto", "[choice] same-question test on: input (target-module input) | output (base answer) | learned "
                "(question_encoder) | auto: learned with the encoder calibrated for the model if one is installed "
                "or shipped, else output")
    question_encoder: str | None = option(None, "query_feature learned: a `moecli calibrate` file (its threshold "
                                                "is used)")
    # the calibration is `moecli.engine.calibration.auto_key`
    auto_calibrate: bool = option(
        True, "query_feature auto on a real model with no key installed or shipped: calibrate one from the shipped "
              "train data first, once per model; false: route by the answer test instead")
    signature_topk: int = option(64, "query_feature output: tokens of the base next-token distribution kept per "
                                     "edit")

    def train_config(self, **over: Any) -> TrainConfig:
        return super().train_config(**{"retain_weight": self.retain_weight, **over})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.context_prefixes <= MAX_PREFIXES:
            raise UserError(f"context_prefixes must be between 0 and {MAX_PREFIXES} (got {self.context_prefixes})")
        if self.expert_form not in EXPERT_FORMS:
            raise UserError(f"expert_form must be one of {', '.join(EXPERT_FORMS)} (got {self.expert_form!r})")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"rank must be ≥ 1 (got {self.rank})")
        if self.positions not in ("all", "answer"):
            raise UserError(f"positions must be 'all' or 'answer' (got {self.positions!r})")
        if self.retain not in ("none", "swap"):
            raise UserError(f"retain must be 'none' or 'swap' (got {self.retain!r})")
        if self.query_feature not in (*QUERY_FEATURES, "auto"):
            raise UserError(f"query_feature must be one of {', '.join(QUERY_FEATURES)}, auto "
                            f"(got {self.query_feature!r})")
        for name in ("anchor_threshold", "query_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be a similarity in [-1, 1] (got {getattr(self, name)})")
        if self.query_feature == "learned":  # checked before anything is written (an adapter carries its own copy)
            if not self.question_encoder:
                raise UserError("query_feature learned needs question_encoder: a file `moecli calibrate` wrote")
            QuestionEncoder.load(self.question_encoder)
        if self.scope_negatives is not None and self.scope_negatives < 0:
            raise UserError(f"scope_negatives must be ≥ 0 (got {self.scope_negatives})")
        if self.signature_topk < 1:
            raise UserError(f"signature_topk must be ≥ 1 (got {self.signature_topk})")

    def resolve(self, model: torch.nn.Module, model_fingerprint: dict | None = None,
                batch_size: int | None = None) -> None:
        """`query_feature: auto`: learned with the encoder calibrated for `model` (`find_encoder`), else output."""
        if self.query_feature == "auto":
            found = find_encoder(model, model_fingerprint)
            self.query_feature = "learned" if found else "output"
            self.question_encoder = str(found) if found else self.question_encoder


PROBE_CHUNK = 64
"""Prompts per forward when probing (grouped by length)."""


REVERTED_THRESHOLD = 2.0
"""The question threshold of a reverted edit: above every similarity the key matcher computes (≤ 1)."""


class BypassMethod(EditMethod):
    """Shared plumbing of the bypass methods; subclasses provide `make_router` and `apply_batch`."""

    config: BypassConfig

    def __init__(self, loaded: LoadedModel, config: BypassConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        model = loaded.model
        target = self.locate()
        self.d_anchor = model.get_input_embeddings().weight.shape[1]
        self.generator = torch.Generator().manual_seed(seed)
        self.context = self.new_context()
        self.matcher: KeyMatcher | None = None  # edit keys (FAISS), for methods that route or scope by key
        self._skeletons: list[str] = []  # question forms seen so far (prompt with the entity blanked)
        self.question: QuestionEncoder | None = None  # query_feature learned: codes of a layer below this one
        self._capture: Capture | None = None
        self._question_missing = ""
        config.resolve(model)
        if config.query_feature == "learned":
            path = config.question_encoder
            if path and Path(path).is_file():
                self._use_question(QuestionEncoder.load(path, self.d_anchor))
            else:  # an adapter brings its own copy (load_state); a new edit needs the file
                self._question_missing = ("query_feature learned needs question_encoder: a file `moecli calibrate` "
                                          "wrote" + (f" ({path}: no such file)" if path else ""))
        router = self.make_router().to(loaded.device)
        self.bypass = MoEBypass(target, self.d_in, self.d_out, router, self.context, self.bypass_options(),
                                self.generator)
        self.bypass.eval()  # inference behaviour (no gate noise) unless the training loop says otherwise
        self.freeze([self.bypass])  # each batch unfreezes what it trains (`trainable`)
        self.injection = Injection(model, self.target_name, self.bypass)

    def _use_question(self, encoder: QuestionEncoder) -> None:
        """Route by `encoder`'s question codes: capture its layer's output in every prompt forward."""
        if encoder.d_model != self.d_anchor:
            raise UserError(f"question encoder: made for a model of width {encoder.d_model}, this one has "
                            f"{self.d_anchor}")
        if not (min(encoder.layers) >= 0 and encoder.layer < self.layer):
            raise UserError(f"question encoder: it reads layer {encoder.layer}, which must be below the edited "
                            f"layer {self.layer}")
        if self._capture is not None:
            self._capture.remove()
        self.question = encoder
        self._capture = Capture(self.loaded.model, encoder.layers, self.context, text=encoder.text_dim > 0)
        if self.matcher is not None:
            self.matcher.encoder = encoder

    # -- to be provided by each method
    def make_router(self) -> torch.nn.Module:
        """The method's router; a method that routes or scopes by key makes its `matcher` here."""
        raise NotImplementedError

    def bypass_options(self) -> BypassOptions:
        """The bypass's experts and where they act, from the config, and the key matcher `make_router` made
        (for key substitution); a method adds what its routes promise (`dataclasses.replace`)."""
        c = self.config
        return BypassOptions(expert_form=c.expert_form, rank=c.rank, scale=c.scale, positions=c.positions,
                             matcher=self.matcher, key_substitution=c.key_substitution and self.matcher is not None)

    # -- shared helpers
    @torch.no_grad()
    def probe(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(anchor vectors [N, d_embed], target-module inputs at the last prompt token [N, d_in], base
        output signatures [N, vocab] or None, question codes [N, k] or None), computed exactly as routing
        computes them at inference.

        One pass of the unedited model gives all three: the target module's input does not depend on the
        bypass beside it, and the signature is the unedited model's next-token distribution, computed at
        the last prompt token only. Rows that name no edited entity get no signature when unmatched inputs
        are null-routed (as at inference, where they are never compared). Prompts run in chunks of similar
        length (`length_groups`)."""
        items = [prompt_only(self.loaded.tokenizer, p) for p in prompts]
        groups = length_groups(items, PROBE_CHUNK)
        parts = [self._probe_chunk([items[i] for i in idx]) for idx in groups]
        back = torch.argsort(torch.tensor([i for idx in groups for i in idx]))

        def joined(k: int) -> torch.Tensor | None:
            return None if parts[0][k] is None else torch.cat([part[k] for part in parts])[back.to(parts[0][k].device)]

        return joined(0), joined(1), joined(2), joined(3)

    def _probe_chunk(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`probe` of one chunk of encoded prompts."""
        grabbed: list[torch.Tensor] = []
        hook = self.bypass.register_forward_pre_hook(lambda m, args: grabbed.append(args[0].detach()))
        batch = collate(items, pad_id_of(self.loaded.tokenizer)).to(self.loaded.device)
        last = torch.tensor([n - 1 for n in batch.prompt_lengths], device=batch.input_ids.device)
        rows = torch.arange(len(items), device=last.device)
        try:
            with bypass_disabled(self.bypass), logits_at(self.loaded.model, rows, last):
                logits = forward(self.loaded.model, batch)
        finally:
            hook.remove()
        inputs = grabbed[-1]
        x = inputs.view(len(items), -1, inputs.shape[-1])[rows, last].float()  # OPT feeds its FFN [B·T, d]
        sig = None
        if self.matcher is not None and self.matcher.feature == "output":
            sig = signature_of(logits.reshape(len(items), -1))
            if self.matcher.null_unmatched:
                sig = sig * self.context.matched.to(sig.device).unsqueeze(-1)
        codes = None
        if self.question is not None:
            codes = self.question.encode(self.context.question_hidden)
        return self.context.vectors.float(), x, sig, codes

    def knows_routes(self) -> bool:
        return self.matcher is not None

    @torch.no_grad()
    def routes(self, prompts: list[str]) -> list[int | None]:
        """The edit each prompt's key match picks (the matcher stores edits in ledger order)."""
        if self.matcher is None or not len(self.matcher):
            return [None] * len(prompts)
        ask = list(range(len(prompts)))
        if self.matcher.null_unmatched:  # a prompt naming no edited entity reaches none: no forward needed
            ask = [i for i, m in enumerate(self.names_an_edited_entity(prompts)) if m]
        routes: list[int | None] = [None] * len(prompts)
        if ask and self._routed_pass([prompts[i] for i in ask]):
            for i, r in zip(ask, self.last_routes(len(ask))):
                routes[i] = r
        return routes

    def names_an_edited_entity(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt names an edited entity (the anchor test, from the token ids alone): one that does
        not gets no expert and no key match when unmatched inputs take the null route."""
        tok = self.loaded.tokenizer
        batch = collate([prompt_only(tok, p) for p in prompts], pad_id_of(tok)).to(self.loaded.device)
        self.context.compute(self.loaded.model.get_input_embeddings(), batch.input_ids, batch.attention_mask)
        return [bool(m) for m in self.context.matched.tolist()]

    def last_routes(self, n: int) -> list[int | None]:
        routed, rows = self.bypass.last_routes is not None, self.matcher.rows if self.matcher is not None else None
        self.bypass.last_routes = None
        if not routed or rows is None or len(rows) != n:
            return [None] * n
        return [int(r) if r >= 0 else None for r in rows.tolist()]

    def _routed_pass(self, prompts: list[str]) -> bool:
        """A forward of the edited model on `prompts` (no logits needed), leaving the routers' decisions;
        False when the routers did not run (no prompt names an edited entity: no edit for any)."""
        tok = self.loaded.tokenizer
        batch = collate([prompt_only(tok, p) for p in prompts], pad_id_of(tok)).to(self.loaded.device)
        empty = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        self.bypass.last_routes = None
        with logits_at(self.loaded.model, empty, empty):
            forward(self.loaded.model, batch)
        return self.bypass.last_routes is not None

    @classmethod
    def revert_tensors(cls, config: dict, tensors: dict[str, torch.Tensor], ledger: list[dict],
                       rows: list[int]) -> dict[str, torch.Tensor]:
        """[choice] A reverted edit keeps its place in the key matcher (rows stay in ledger order) but its
        question threshold is set above any similarity, so no input matches it again: its prompts get
        the null route, the base model's own output, while every other edit routes as before. Only an
        adapter that routes by stored keys can do this (not MEMoE with `scope: false`, nor LEMoE's `kv`)."""
        if "matcher.thresholds" not in tensors:
            super().revert_tensors(config, tensors, ledger, rows)
        out = dict(tensors)
        thresholds = tensors["matcher.thresholds"].clone()
        thresholds[rows] = REVERTED_THRESHOLD
        out["matcher.thresholds"] = thresholds
        return out

    def store_edits(self, records: list[EditRecord], values: list[int]) -> None:
        """Put the records' anchors and last-token questions into the key matcher, routing to `values`.

        [choice] Each edit gets its own thresholds from the other question forms seen in the stream so
        far (other edits' prompts with their entity replaced by this edit's), which must not match it.
        With `query_feature: input` its question threshold is raised above the most similar of them.
        With `output`, a form the base model answers the same way (say "X lives in" and "X was born in",
        both "Kazan") cannot be told apart by the answer, so it is kept beside the edit and an input
        must be nearer the edit than it by target-module input: this is how such a pair is kept apart,
        using nothing but the edit prompts.
        """
        if self.matcher.feature == "learned" and self.question is None:
            raise UserError(self._question_missing)
        anchors, inputs, sigs, codes = self.probe([r.prompt for r in records])
        queries = codes if codes is not None and self.matcher.feature == "learned" else inputs
        for r in records:
            if r.subject and r.subject in r.prompt:
                skeleton = r.prompt.replace(r.subject, "\x00", 1)
                if skeleton not in self._skeletons:
                    self._skeletons.append(skeleton)
        base = float(self.matcher.query_threshold)
        thresholds = torch.full((len(records),), base)
        confusable: list[tuple[int, torch.Tensor]] = []
        k, margin = self.scope_negatives(), self.config.scope_margin
        if k > 0 and len(self._skeletons) > 1:
            negs, owner = [], []
            for i, r in enumerate(records):
                if not (r.subject and r.subject in r.prompt):
                    continue
                own = r.prompt.replace(r.subject, "\x00", 1)
                forms = [sk for sk in self._skeletons[-(k + 1):] if sk != own][-k:]
                negs += [sk.replace("\x00", r.subject) for sk in forms]
                owner += [i] * len(forms)
            if negs:
                _, neg_x, neg_s, neg_codes = self.probe(negs)
                neg_q = neg_codes if self.matcher.feature == "learned" else neg_x
                own_idx = torch.tensor(owner)
                sims = self.matcher.pair_similarity(neg_q, neg_s, queries[own_idx],
                                                    None if sigs is None else sigs[own_idx])
                for j, (i, sim) in enumerate(zip(owner, sims.tolist())):
                    if self.matcher.feature in VECTOR_FEATURES:
                        thresholds[i] = max(thresholds[i].item(), min(sim + margin, 0.99))
                    elif sim >= base:  # answered the same way: only the input can tell them apart
                        confusable.append((i, neg_q[j]))
        hashes = torch.tensor([[prompt_hash(ids) for ids in self._prompt_ids(r)] for r in records])
        self.matcher.add(anchors, queries, values, thresholds, sigs, confusable, raw=inputs, prompt_hashes=hashes)

    def scope_negatives(self) -> int:
        """How many other question forms each new edit's threshold is raised above (config; None: by feature)."""
        k = self.config.scope_negatives
        return k if k is not None else (0 if self.config.query_feature == "learned" else 16)

    def make_matcher(self, null_route: bool = True, index: str = "auto") -> KeyMatcher:
        """The key matcher of the methods that route or scope by (entity, question)."""
        c = self.config
        threshold = self.question.threshold if self.question is not None else c.query_threshold
        return KeyMatcher(self.d_anchor, self.d_in, c.anchor_threshold, threshold, null_route, index,
                          feature=c.query_feature, topk=c.signature_topk, encoder=self.question)

    def _prompt_ids(self, record: EditRecord) -> list[list[int]]:
        """The record's prompt as the routing context sees it (no BOS, no padding): as asked (generation,
        scoring) and as trained (where the tokenizer merges the prompt's end with the answer)."""
        tok, skip = self.loaded.tokenizer, self.context.skip_token_ids
        pair = encode_pair(tok, record.prompt, record.target)
        return [[t for t in ids if t not in skip]
                for ids in (prompt_only(tok, record.prompt).ids, pair.ids[: pair.answer_start])]

    def register_anchors(self, records: list[EditRecord]) -> None:
        """Add each record's subject (the knowledge anchor) to the trie used for routing, and its prompt,
        as the routing context will see it, anchored on that subject (`AnchorTrie.add_exact`)."""
        tok, trie = self.loaded.tokenizer, self.context.trie
        for r in records:
            if r.subject:
                trie.add_subject(tok, r.subject)
                canon = tok(" " + r.subject, add_special_tokens=False)["input_ids"]
                for ids in self._prompt_ids(r):
                    trie.add_exact(ids, canon)

    def prefix_texts(self) -> list[str]:
        """The run's `context_prefixes` prefixes, written once by the unedited model (seeded by the run's seed, so
        a resumed run writes the same)."""
        n = self.config.context_prefixes
        if n and getattr(self, "_prefixes", None) is None:
            generator = torch.Generator().manual_seed(self.seed * 7919 + 17)
            self._prefixes = context_prefixes(self.loaded, n, generator, lambda: bypass_disabled(self.bypass))
        return self._prefixes if n else []

    def edit_pairs(self, records: list[EditRecord]) -> list[tuple[str, str]]:
        """The (prompt, target) pairs a batch trains: each edit prompt, and a copy of it behind each of the run's
        `context_prefixes` prefixes."""
        return [(p + r.prompt, r.target) for r in records for p in ["", *self.prefix_texts()]]

    @contextmanager
    def augmented_routes(self, records: list[EditRecord]) -> Iterator[None]:
        """While `records` (the matcher's newest rows) train, their prefixed copies reach their edits as their
        prompts do: a copy that the key would not match could not be trained at all. Nothing of it is saved."""
        if not self.config.context_prefixes or self.matcher is None:
            yield
            return
        first = len(self.matcher) - len(records)
        rows_of = {prompt_hash(ids): first + i for i, r in enumerate(records) for p in self.prefix_texts()
                   for ids in self._prompt_ids(dataclasses.replace(r, prompt=p + r.prompt))}
        with self.matcher.pinned(rows_of):
            yield

    def retain_set(self, records: list[EditRecord]) -> RetainSet | None:
        """Subject-swapped prompts whose base outputs must be kept ([choice] `retain: swap`).

        For edit i, take other edits' prompts that ask something else and put subject i in them:
        these name the edited entity yet ask another question, the case where subject routing
        alone would change answers it should not. Built from the batch itself, never from the
        evaluation's locality prompts.
        """
        cfg = self.config
        if cfg.retain != "swap" or cfg.retain_per_edit < 1:
            return None
        rng = random.Random(self.seed * 7919 + len(records))
        with_subject = [r for r in records if r.subject and r.subject in r.prompt]
        prompts: list[str] = []
        for r in with_subject:
            skeleton = r.prompt.replace(r.subject, "\x00")
            others = [o for o in with_subject if o.prompt.replace(o.subject, "\x00") != skeleton]
            for o in rng.sample(others, min(cfg.retain_per_edit, len(others))):
                prompts.append(o.prompt.replace(o.subject, r.subject))
        if not prompts:
            return None
        model = self.loaded.model

        def base_forward(batch):
            with bypass_disabled(self.bypass):
                return forward(model, batch)

        return RetainSet.from_prompts(model, self.loaded.tokenizer, prompts, base_forward)

    def unedited(self):
        """For the training loop (`PromptCache`): a context in which the model runs unedited, when the bypass
        changes no position before a prompt's last token (`positions: answer`); None when it acts on all."""
        if self.config.positions != "answer":
            return None
        return lambda: bypass_disabled(self.bypass)

    def trainable(self, modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def freeze(self, modules: list[torch.nn.Module]) -> None:
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.bypass.state_dict().items()
                   if not k.startswith("base.")}
        config = {
            "method": self.name, **asdict(self.config), "layer": self.layer, "target_module": self.target_name,
            "d_in": self.d_in, "d_out": self.d_out, "n_experts": len(self.bypass.experts),
        }
        files = {"anchors.json": self.context.trie.to_bytes()}
        if self.matcher is not None:
            more_tensors, more_files = self.matcher.state()
            tensors.update(more_tensors)
            files.update(more_files)
            files["skeletons.json"] = json.dumps(self._skeletons).encode()
        if self.question is not None:  # the adapter routes without the calibration file
            tensors.update(self.question.tensors("question."))
        return config, tensors, files

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        while len(self.bypass.experts) < adapter_config.get("n_experts", 0):
            self.bypass.add_expert(self.generator)
        if "question.weight" in tensors:
            self._use_question(QuestionEncoder.from_tensors(tensors, "question."))
        state = {k: v.to(self.loaded.device) for k, v in tensors.items()
                 if not k.startswith(("matcher.", "question."))}
        missing, unexpected = self.bypass.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise UserError(f"adapter tensors do not match {self.name}: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}")
        self.context.trie = AnchorTrie.from_json(json.loads(files.get("anchors.json", b"{}")))
        if self.matcher is not None:
            self.matcher.load(tensors, files)
        self._skeletons = json.loads(files.get("skeletons.json", b"[]"))
        self.freeze([self.bypass])

    def remove(self) -> None:
        self.injection.remove()
        if self._capture is not None:
            self._capture.remove()
