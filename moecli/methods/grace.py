"""GRACE (Hartvigsen et al., NeurIPS 2023): a key→value codebook with deferral radii at one layer.

The target module is wrapped (`GraceLayer`, swapped in by the same `Injection` as the MoE bypass).
For each input the *key* is the module's input at the last prompt token [paper: the layer's
activation at the last token; EasyEdit: `args[0][:, key_id]`]. If the nearest codebook key lies
within its radius ε (L2 distance, `<=` as EasyEdit), the module's output is *replaced* by that
entry's value vector, otherwise the module runs untouched: an input outside every radius gets the
base model's output bit for bit, which is GRACE's perfect locality (and, since rephrases land
outside small radii, its poor generality).

Where the value replaces the output (`replacement`):
- `all` [choice, the default; EasyEdit `replace_all`]: at every position of the sequence, prompt and
  answer tokens alike, so a single vector steers every answer token it is trained on;
- `last` [paper, as trained there]: only at the last prompt token; answer tokens see the base output and reach the
  value through attention.
Both are the same function in training, teacher-forced scoring and generation: the decision is taken
once per input at the last prompt token, and later generation steps (KV cache filled, flagged by
`AnchorContext.continuation` from the injection) keep it rather than re-key on the newest token
(EasyEdit's `generate` re-keys every step, so its generations can disagree with its scores). With
`last`, a later step replaces nothing (the replaced position is already in the KV cache) unless it
re-feeds the whole sequence (`use_cache=False`), where the prompt's last token is replaced again.

Editing, one record at a time even inside a batch [paper, Alg. 1], with d the distance from the new
key h to its nearest key k_c (radius ε_c, target y_c) and ε₀ = `eps`:
- empty codebook or d > ε₀ + ε_c: add (h, v, ε₀, y), with v initialised to the module's output at the
  last prompt token (EasyEdit `val_init: warm`; its llama yaml picks `cold`, random) and trained by the
  shared loop until y is the argmax;
- same target (y = y_c): expand, ε_c = max(ε_c, d) [EasyEdit `eps_expand: coverage`], train v_c further;
- other target: split, ε_c and the new radius both shrink to at most d/2 [paper; EasyEdit sets them to
  d/2 even when that grows ε_c, moecli never grows a radius on a conflict];
- d = 0 (the very same key) with another target: the entry is retargeted and its value retrained
  [choice: the newest fact wins; a split would give two radius-0 keys and EasyEdit's tie-break would
  reach neither].
An expanded radius gets a relative slack of 1e-4 [choice], so the new prompt is not lost at the
boundary to float noise between the probing forward and later forwards.

Capacity: one vector per edit. On the tiny random test models it flips one-token answers but cannot
spell multi-token ones (it moves every answer position alike), in either replacement mode; how it
fares on real models is for the benchmarks to say.

Checkpoint: keys [N, d_in], values [N, d_out], radii [N] (float32 tensors) and the targets (JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moecli.adapter.bypass import Injection, flat_batch
from moecli.adapter.training import Progress, train_on_pairs
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.methods.base import EditMethod, MethodConfig, layer_fraction_option, option
from moecli.model.batching import collate, forward, pad_id_of, prompt_only
from moecli.model.loading import LoadedModel
from moecli.routing.context import AnchorContext
from moecli.routing.keys import KeyMatcher

EXPAND_SLACK = 1e-4  # relative margin added to an expanded radius (see the module docstring)
TARGETS_FILE = "grace_targets.json"
REPLACEMENTS = ("all", "last")


@dataclass
class GRACEConfig(MethodConfig):
    """GRACE options; defaults are EasyEdit's `hparams/GRACE/llama-7B.yaml` unless marked [choice]."""

    layer: int | None = option(None, "decoder layer whose FFN output module holds the codebook; null: the one "
                                     "`layer_fraction` gives")
    layer_fraction: float = layer_fraction_option(0.56, "[choice] LEMoE's depth, as FT-L and LoRA (EasyEdit: the "
                                                        "last layer)")
    lr: float = option(1.0, "[EasyEdit edit_lr] learning rate of the value vector")
    max_steps: int = option(100, "[EasyEdit n_iter] optimisation steps per edit")
    weight_decay: float = option(0.0, "[EasyEdit] weight decay of the values (none)")
    early_stop: bool = option(True, "[choice; EasyEdit lists reg: early_stop] stop once every target token is right")
    eps: float = option(1.0, "[EasyEdit eps] ε₀, the initial deferral radius of a new key (L2 distance)")
    replacement: str = option("all", "[choice] all: the value replaces every position (EasyEdit replace_all) | "
                                     "last: only the last prompt token [paper]")
    eos_target: bool = option(False, "[choice; EasyEdit appends nothing] one value vector steers every answer "
                                     "position alike, so it cannot say the target and then stop")

    def validate(self) -> None:
        super().validate()
        if self.replacement not in REPLACEMENTS:
            raise UserError(f"replacement must be one of {', '.join(REPLACEMENTS)} (got {self.replacement!r})")
        if self.eps <= 0:
            raise UserError(f"eps must be > 0 (got {self.eps})")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")


class GraceLayer(nn.Module):
    """The frozen target module plus a codebook; replaces the output where a key is within its radius.

    A `WrappedLayer`, so `Injection` places and removes it and its pre-hook fills `context.prompt_last` /
    `context.continuation`.
    """

    def __init__(self, base: nn.Module, d_in: int, d_out: int, context: AnchorContext,
                 replacement: str = "all") -> None:
        super().__init__()
        self.base = base
        self.replacement = replacement
        self.d_in, self.d_out = d_in, d_out
        self.context = context
        self.enabled = True
        self.matcher: KeyMatcher | None = None  # routes by its codebook, not by a key matcher
        device = next(base.parameters()).device
        self.register_buffer("keys", torch.zeros(0, d_in, device=device))
        self.register_buffer("radii", torch.zeros(0, device=device))
        self.values = nn.ParameterList()
        self.capture = False  # when set, forward keeps the query and base output at the last prompt token
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cached: torch.Tensor | None = None  # entry per row of the prompt step, for later generation steps

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def add_entry(self, key: torch.Tensor, value: torch.Tensor, radius: float | torch.Tensor) -> int:
        """Append (key, value, radius); returns the entry's index."""
        dev = self.keys.device
        self.keys = torch.cat([self.keys, key.detach().float().reshape(1, -1).to(dev)])
        radius = torch.as_tensor(radius, dtype=torch.float32, device=dev).reshape(1)
        self.radii = torch.cat([self.radii, radius])
        self.values.append(nn.Parameter(value.detach().float().reshape(-1).to(dev).clone(), requires_grad=False))
        return len(self) - 1

    def set_codebook(self, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor) -> None:
        """Replace the whole codebook at once (checkpoint reload: one copy, not one per entry)."""
        dev = self.keys.device
        self.keys = keys.detach().float().to(dev).clone()
        self.radii = radii.detach().float().to(dev).clone()
        self.values = nn.ParameterList(nn.Parameter(v.float().to(dev).clone(), requires_grad=False) for v in values)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 distance [B], index [B]) of each query's nearest key; the codebook must not be empty.

        The direct (not matrix-product) form of cdist: a query equal to a key is at distance 0, not
        at the cancellation noise of ‖q‖² + ‖k‖² − 2q·k, which matters for radii decisions.
        """
        d = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        return d.min(-1)

    def route(self, queries: torch.Tensor) -> torch.Tensor:
        """Entry per query [B]: the nearest key's index if within its radius, else −1."""
        if len(self) == 0:
            return torch.full((queries.shape[0],), -1, dtype=torch.long, device=queries.device)
        dist, idx = self.nearest(queries)
        return torch.where(dist <= self.radii[idx], idx, torch.full_like(idx, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = flat_batch(x, self.context)
        if b is not None:  # OPT feeds its FFN the batch's tokens flattened
            return self._forward3(x.view(b, -1, x.shape[-1]), y.view(b, -1, y.shape[-1])).view_as(y)
        return self._forward3(x, y)

    def _forward3(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        ctx = self.context
        rows = torch.arange(b, device=x.device)
        last = (ctx.prompt_last.to(x.device) if ctx.prompt_last is not None
                else torch.full((b,), x.shape[1] - 1, device=x.device))
        if ctx.continuation and self._cached is not None and self._cached.shape[0] == b:
            entry = self._cached  # a later generation step: keep the prompt's decision
        else:
            last = last.clamp(max=x.shape[1] - 1)
            query = x[rows, last].float()
            if self.capture:
                self.captured = (query.detach(), y[rows, last].detach().float())
            entry = self.route(query) if self.enabled else torch.full((b,), -1, dtype=torch.long, device=x.device)
            self._cached = entry
        if not self.enabled or not bool((entry >= 0).any()):
            return y
        local = last - ctx.offset if ctx.continuation else last  # the last prompt token in this forward
        out = y.clone()
        for row in (entry >= 0).nonzero().flatten().tolist():
            value = self.values[int(entry[row])].to(y.dtype)
            if self.replacement == "all":
                out[row] = value.expand(y.shape[1], -1)
            elif 0 <= int(local[row]) < y.shape[1]:  # a later step has it in the KV cache already
                out[row, int(local[row])] = value
        return out


class GRACE(EditMethod):
    """GRACE's codebook at the target module; each edit adds, expands or splits one entry."""

    name = "grace"
    config_class = GRACEConfig
    config: GRACEConfig

    def __init__(self, loaded: LoadedModel, config: GRACEConfig, seed: int = 0) -> None:
        super().__init__(loaded, config, seed)
        target = self.locate()
        self.grace = GraceLayer(target, self.d_in, self.d_out, self.new_context(), config.replacement)
        self.grace.eval()
        self.injection: Injection | None = Injection(loaded.model, self.target_name, self.grace)
        self.targets: list[str] = []  # per entry: the answer its value was trained for
        self._entries_of_last: list[int] = []

    @torch.no_grad()
    def probe(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, base output) of the target module at the prompt's last token."""
        batch = collate([prompt_only(self.loaded.tokenizer, prompt)], pad_id_of(self.loaded.tokenizer))
        self.grace.capture = True
        try:
            forward(self.loaded.model, batch.to(self.loaded.device))
        finally:
            self.grace.capture = False
        key, out = self.grace.captured
        self.grace.captured = None
        return key[0], out[0]

    def _place(self, key: torch.Tensor, base_out: torch.Tensor, target: str) -> tuple[int, str]:
        """Update the codebook for a new edit (paper, Alg. 1); returns (entry to train, what happened)."""
        g, eps = self.grace, self.config.eps
        if len(g) == 0:
            return self._add(key, base_out, eps, target), "add"
        dist, idx = g.nearest(key.reshape(1, -1))
        d, c = dist[0], int(idx[0])
        if d > eps + g.radii[c]:
            return self._add(key, base_out, eps, target), "add"
        if target == self.targets[c]:
            g.radii[c] = torch.maximum(g.radii[c], d * (1 + EXPAND_SLACK))
            return c, "expand"
        if float(d) == 0.0:
            with torch.no_grad():
                g.values[c].copy_(base_out)
            self.targets[c] = target
            return c, "retarget"
        half = d / 2
        g.radii[c] = torch.minimum(g.radii[c], half)
        return self._add(key, base_out, torch.clamp(half, max=eps), target), "split"

    def _add(self, key: torch.Tensor, value: torch.Tensor, radius: float | torch.Tensor, target: str) -> int:
        self.targets.append(target)
        return self.grace.add_entry(key, value, radius)

    def apply_batch(self, records: list[EditRecord], batch_index: int, progress: Progress | None = None) -> dict:
        """Each record is its own edit: place it in the codebook, then train that entry's value."""
        steps, loss, all_correct, seconds = 0, 0.0, True, 0.0
        actions = {"add": 0, "expand": 0, "split": 0, "retarget": 0}
        self._entries_of_last = []
        for k, r in enumerate(records):
            target = r.target.strip()
            key, base_out = self.probe(r.prompt)
            entry, action = self._place(key, base_out, target)
            actions[action] += 1
            value = self.grace.values[entry]
            value.requires_grad_(True)
            try:
                stats = train_on_pairs(self.loaded.model, self.loaded.tokenizer, [value], [(r.prompt, r.target)],
                                       self.config.train_config())
            finally:
                value.requires_grad_(False)
                value.grad = None
            steps, loss, seconds = steps + stats.steps, loss + stats.loss, seconds + stats.seconds
            all_correct &= stats.all_correct
            self._entries_of_last.append(entry)
            if progress:
                progress("edits", k + 1, len(records))
        return {"steps": steps, "loss": loss / max(len(records), 1), "all_correct": all_correct,
                "seconds": seconds, "codebook": len(self.grace), **actions}

    def expert_of(self, record_index_in_batch: int) -> int | None:
        return self._entries_of_last[record_index_in_batch] if self._entries_of_last else None

    @classmethod
    def revert_tensors(cls, config: dict, tensors: dict[str, torch.Tensor], ledger: list[dict],
                       rows: list[int]) -> dict[str, torch.Tensor]:
        """An edit's codebook entry gets a negative radius (no distance is within it), unless the entry
        also holds an edit that stays (an expanded entry): then they can only be taken back together."""
        entries = {int(ledger[i]["expert"]) for i in rows if ledger[i].get("expert") is not None}
        for i, entry in enumerate(ledger):
            if i not in rows and not entry.get("reverted") and entry.get("expert") in entries:
                raise UserError(f"grace: edit {entry['id']} shares codebook entry {entry['expert']} with an edit "
                                "being reverted; revert them together")
        out = dict(tensors)
        radii = tensors["grace.radii"].clone()
        radii[sorted(entries)] = -1.0
        out["grace.radii"] = radii
        return out

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, bytes]]:
        g = self.grace
        values = torch.stack(list(g.values)) if len(g) else torch.zeros(0, self.d_out)
        tensors = {"grace.keys": g.keys.detach().cpu().contiguous(),
                   "grace.values": values.detach().cpu().contiguous(),
                   "grace.radii": g.radii.detach().cpu().contiguous()}
        config = {"method": self.name, **asdict(self.config), "layer": self.layer, "target_module": self.target_name,
                  "d_in": self.d_in, "d_out": self.d_out, "n_entries": len(g)}
        return config, tensors, {TARGETS_FILE: json.dumps(self.targets).encode()}

    def load_state(self, adapter_config: dict, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
        try:
            keys, values, radii = (tensors[f"grace.{k}"] for k in ("keys", "values", "radii"))
        except KeyError as exc:
            raise UserError(f"adapter: missing tensor {exc.args[0]!r} (not a GRACE checkpoint)") from None
        targets = json.loads(files.get(TARGETS_FILE, b"null"))
        n = keys.shape[0]
        if (keys.shape[1:] != (self.d_in,) or values.shape != (n, self.d_out) or radii.shape != (n,)
                or not isinstance(targets, list) or len(targets) != n):
            raise UserError(f"adapter: GRACE codebook does not fit {self.target_name} (d_in={self.d_in}, "
                            f"d_out={self.d_out}) or {TARGETS_FILE} is missing")
        self.grace.set_codebook(keys, values, radii)
        self.targets = [str(t) for t in targets]

    def remove(self) -> None:
        if self.injection is not None:
            self.injection.remove()
            self.injection = None
