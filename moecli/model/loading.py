"""Load a local Hugging Face causal LM, freeze it, fingerprint it, and find its FFN output module.

Why one module owns this: every method edits the same place (the FFN output projection of one
decoder layer), and the architecture is known from `config.model_type`, never guessed from the
model's name. Everything family-specific lives in two tables below (`SUPPORTED_FAMILIES` and
`_LAYER_PATHS`); adding a family means adding one line to each and a config in `moecli.model.tiny`.

The base model is frozen on load (`requires_grad=False`, `eval()`): nothing in moecli trains or
modifies base weights, and `fingerprint` lets an adapter check that it is applied to the very
base model it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from moecli.errors import UserError, one_line
from moecli.model.sources import quiet_progress, resolve_model

# model_type -> path of the FFN output projection inside one decoder layer.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "gemma": "mlp.down_proj",
    "gemma3_text": "mlp.down_proj",
    "phi3": "mlp.down_proj",
    "gpt2": "mlp.c_proj",  # transformers' Conv1D: weight is (d_in, d_out), transposed vs Linear
    "gptj": "mlp.fc_out",
    "gpt_neox": "mlp.dense_4h_to_h",
    "falcon": "mlp.dense_4h_to_h",
    "opt": "fc2",
}

# model_type -> path of the decoder-layer ModuleList inside the *ForCausalLM model.
_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "falcon": "transformer.h",
    "opt": "model.decoder.layers",
}

# model_type -> config key of a learned table of position embeddings. These families cannot run an
# input longer than the table at all (an IndexError deep inside torch); the others (rotary, ALiBi)
# run any length, only less well beyond what they were trained on.
_POSITION_TABLES: dict[str, str] = {"gpt2": "n_positions", "opt": "max_position_embeddings"}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Config keys that describe how a model was loaded or run, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "architectures",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

# At most this many values of each tensor enter the weights hash.
FINGERPRINT_SAMPLES = 4096


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer and where it lives.

    `device` is where inputs must go (the input embeddings' device when accelerate spreads the
    model over several devices); `dtype` is the dtype the weights were loaded in.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    family: str
    device: torch.device
    dtype: torch.dtype


def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_FAMILIES))



def resolve_device(device: str | torch.device) -> torch.device:
    """Turn `--device auto|cpu|cuda[:N]|...` into a torch device; `auto` picks CUDA when present.

    Asking for CUDA on a machine without it is a user error, not a crash deep inside torch.
    """
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {device}: not a device (expected auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: no such GPU (this machine has {torch.cuda.device_count()})")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn `--dtype auto|float32|bfloat16|float16` into a torch dtype.

    `auto` is bfloat16 on a GPU that supports it (half the memory, the precision LLMs are
    trained in) and float32 everywhere else, because CPU bf16 matmuls are slow and imprecise.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of auto, float32, bfloat16, float16")
    return _DTYPES[name]



def _read_model_type(path: Path) -> str:
    """Read `model_type` from config.json directly, so an unknown type gives our own message."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model {path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--model {path}: cannot read config.json: {one_line(exc, with_type=True)}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"--model {path}: config.json has no model_type; supported families: {_supported_list()}")
    if model_type not in SUPPORTED_FAMILIES:
        raise UserError(
            f"--model {path}: model type '{model_type}' is not supported; supported families: {_supported_list()}"
        )
    return model_type


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Give a tokenizer without a pad token one (eos, else unk) so batches can be padded.

    Reusing an existing token keeps the vocabulary, and so the model's embeddings, unchanged;
    the attention mask makes the choice of pad id irrelevant to the outputs.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise UserError(
            f"--model {path}: the tokenizer has no pad, eos or unk token to pad batches with; "
            "set \"pad_token\" in its tokenizer_config.json to a token of its vocabulary"
        )


def load_model(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a local causal LM and its tokenizer, frozen and in eval mode.

    `path`: a Hugging Face model directory, a `.gguf` file (or a directory holding one), or the name of
    a packaged model (`smollm2`); see `moecli.model.sources` (a GGUF file is converted once and cached).

    With `device_map` (e.g. "auto") accelerate places the model and it is not moved afterwards;
    `LoadedModel.device` is then the device of the input embeddings, where inputs must go.
    Nothing is downloaded (`local_files_only`). Every failure is a `UserError` of one line that
    names the path, because a wrong or damaged model directory is something the user fixes.
    """
    # a packaged name or a GGUF file becomes its cached HF directory; a directory already resolved (the CLI
    # resolves --model once, with a progress bar) is taken as it is
    model_path = Path(path) if (Path(path) / "config.json").is_file() else resolve_model(path)
    if not model_path.is_dir():
        raise UserError(f"--model {path}: not a model directory nor a .gguf file")
    family = _read_model_type(model_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    try:
        with quiet_progress():
            # transformers 5 names the kwarg `dtype` (`torch_dtype` is deprecated).
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, device_map=device_map, local_files_only=True
            )
    except Exception as exc:  # any load failure means a damaged or foreign directory
        raise UserError(f"--model {path}: cannot load the model: {one_line(exc, with_type=True)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:
        raise UserError(f"--model {path}: cannot load the tokenizer: {one_line(exc, with_type=True)}") from exc
    _ensure_pad_token(tokenizer, model_path)

    model.requires_grad_(False)
    model.eval()
    if device_map is None:
        model.to(torch_device)
    else:
        torch_device = model.get_input_embeddings().weight.device
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        # Set on the generation config, not the model config, so the fingerprint is unchanged.
        generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=model_path,
        family=family,
        device=torch_device,
        dtype=torch_dtype,
    )


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest input (in tokens) `model` can run at all, or None when it has no hard limit."""
    config = getattr(model, "config", None)
    key = _POSITION_TABLES.get(getattr(config, "model_type", None))
    value = getattr(config, key, None) if key else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UserError(f"model type '{model_type}' is not supported; supported families: {_supported_list()}")
    return model_type


def _get_path(root: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Module) else None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks, found by the family's known path.

    Wrappers (a peft model, a custom container) put prefixes in front of that path, so when the
    direct path is absent the shortest module name ending in it is used instead.
    """
    suffix = _LAYER_PATHS[_model_type(model)]
    direct = _get_path(model, suffix)
    if isinstance(direct, torch.nn.ModuleList):
        return direct
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
    ]
    if not matches:
        raise UserError(f"cannot find the decoder layers ('{suffix}') in this {type(model).__name__}")
    return min(matches, key=lambda item: len(item[0]))[1]


class _Stop(Exception):
    """Ends a forward once the modules asked for have run."""


def outputs_until(run: Callable[[], object], modules: Mapping[int, torch.nn.Module],
                  skip: Callable[[], bool] = lambda: False) -> dict[int, torch.Tensor]:
    """The output of each of `modules` (its first element when a tuple) in the forward `run()` makes, by key;
    the forward is stopped as soon as the last of them has run, so the layers above cost nothing. A call for
    which `skip()` is true is not the one asked for (a pass nested inside the forward) and is passed over."""
    grabbed: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def grab(_module, _args, output):
            if skip():
                return
            grabbed[key] = output[0] if isinstance(output, (tuple, list)) else output
            if len(grabbed) == len(modules):
                raise _Stop

        return grab

    handles = [module.register_forward_hook(hook(key)) for key, module in modules.items()]
    try:
        run()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return grabbed


def num_layers(model: torch.nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_layers(model))


def default_layer(model: torch.nn.Module, fraction: float = 0.56) -> int:
    """The layer index to edit by default: `round(fraction * (num_layers - 1))`, clamped to the range.

    The fraction is a position between the first (0) and the last layer (1), so it means the same
    depth on a 3-layer model and a 32-layer one: 0.56 gives index 17 of 0..31, the 18th layer, where
    LEMoE edits LLaMA2-7B. Rounds half up.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = num_layers(model)
    return min(max(int(math.floor(fraction * (n - 1) + 0.5)), 0), n - 1)


def find_target_module(model: torch.nn.Module, layer: int) -> tuple[str, torch.nn.Module]:
    """The FFN output module of decoder layer `layer`, with its qualified name in `model`.

    The name is what `model.get_submodule` accepts and what checkpoints record, so an adapter
    can be re-attached to the same place after a reload.
    """
    layers = decoder_layers(model)
    n = len(layers)
    try:
        index = operator.index(layer)  # accepts numpy/torch integers, refuses floats and strings
    except TypeError as exc:
        raise UserError(f"--layer {layer}: not an integer") from exc
    if isinstance(layer, bool) or not 0 <= index < n:
        raise UserError(f"--layer {layer} out of range: model has {n} layers (0..{n - 1})")
    sub_path = SUPPORTED_FAMILIES[_model_type(model)]
    module = _get_path(layers[index], sub_path)
    if module is None:
        raise UserError(f"decoder layer {layer} has no '{sub_path}' module")
    for name, candidate in model.named_modules():
        if candidate is module:
            return name, module
    raise UserError(f"decoder layer {layer}: '{sub_path}' is not reachable from the model")  # pragma: no cover


def module_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear, a transformers Conv1D (weight stored (d_in, d_out)), or a wrapper.

    Wrapped layers (peft's `base_layer`) report the dims of the layer they wrap.
    """
    base = getattr(module, "base_layer", None)
    if isinstance(base, torch.nn.Module):
        return module_dims(base)
    if isinstance(module, Conv1D):
        return int(module.nx), int(module.nf)
    if isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return int(module.in_features), int(module.out_features)
    raise UserError(f"unsupported target module type {type(module).__name__} (expected Linear or Conv1D)")


def _config_hash(model: torch.nn.Module) -> str:
    config = model.config
    data = json.loads(config.to_json_string())
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    """A deterministic strided sample of at most FINGERPRINT_SAMPLES values, as portable bytes."""
    if tensor.device.type == "meta":
        return b"meta"  # offloaded by accelerate: no values here, name and shape still count
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    k = min(n, FINGERPRINT_SAMPLES)
    index = (torch.arange(k, dtype=torch.int64) * n // k).to(flat.device)
    sample = flat.index_select(0, index)
    if sample.is_floating_point():
        # Round to bfloat16 precision: a float32 model and its bf16-loaded copy then agree.
        sample = sample.float().to(torch.bfloat16).float()
        return sample.cpu().numpy().astype("<f4").tobytes()
    return sample.to(torch.int64).cpu().numpy().astype("<i8").tobytes()


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Identify a base model: `{"model_type", "config_hash", "weights_hash"}`.

    config_hash: sha256 of the config JSON without keys that describe loading rather than the
    model (`_name_or_path`, `transformers_version`, `dtype`, `use_cache`, `architectures`, ...).

    weights_hash: sha256 over every state-dict entry (parameters and persistent buffers) in name
    order: its name, its shape, and a strided sample of at most 4096 of its values (indices
    `i * n // k`, which always include the first value). The trade-off is deliberate: hashing
    every value of a 7B model reads 14 GB and takes minutes, the sample takes well under a
    second; any change of shape, of a tensor's presence, or of a sampled value changes the hash,
    while a change confined to unsampled values of a large tensor goes unnoticed, which is
    acceptable for telling base models apart, not for proving integrity. Sampled float values
    are rounded to bfloat16 precision before hashing, so the hash does not depend on device or
    on loading as float32 or bfloat16 (float16 copies usually match too, but double rounding can
    differ). Integer buffers are hashed exactly. The names are those of the model as given: a
    wrapped model (e.g. peft) has other names and so another fingerprint.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(_sample_bytes(tensor))
    return {
        "model_type": str(getattr(model.config, "model_type", "")),
        "config_hash": _config_hash(model),
        "weights_hash": digest.hexdigest(),
    }


def fingerprints_match(a: dict, b: dict) -> bool:
    """True when two fingerprints name the same base model (all three fields equal and present)."""
    keys = ("model_type", "config_hash", "weights_hash")
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in keys)


class LayerStandIn(torch.nn.Module):
    """A decoder layer standing in for a frozen one (`inner`) while outputs it already computed are
    replayed: training (`moecli.adapter.training.FrozenPrefix`) and the base-output signature pass
    (`moecli.adapter.bypass.Injection`). Subclasses say what `forward` returns."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # decoder loops read attributes of their layers (Gemma 3: attention_type)
            return getattr(self.inner, name)
