"""Tests of moecli.model.loading on tiny random models of every supported family (no downloads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from moecli.errors import UserError
from moecli.model.loading import (
    SUPPORTED_FAMILIES,
    LoadedModel,
    decoder_layers,
    default_layer,
    find_target_module,
    fingerprint,
    fingerprints_match,
    load_model,
    module_dims,
    num_layers,
    resolve_device,
    resolve_dtype,
)
from moecli.model.tiny import HIDDEN, INTERMEDIATE, make_tiny_model

ALL_FAMILIES = sorted(SUPPORTED_FAMILIES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy CI machine the thread pool's
    spin-waiting makes each forward ~100x slower; restore the setting for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_loads_finds_target_and_runs_a_padded_batch(family: str, tmp_path: Path) -> None:
    path = make_tiny_model(family, tmp_path / family, seed=0, num_layers=4)
    loaded = load_model(path, device="cpu", dtype="auto")

    assert isinstance(loaded, LoadedModel)
    assert loaded.family == family
    assert loaded.path == path
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert num_layers(loaded.model) == 4
    assert len(decoder_layers(loaded.model)) == 4

    name, module = find_target_module(loaded.model, 1)
    assert name.endswith(f"1.{SUPPORTED_FAMILIES[family]}")
    assert loaded.model.get_submodule(name) is module
    if family == "gpt2":
        assert isinstance(module, Conv1D)
    else:
        assert isinstance(module, torch.nn.Linear)
    assert module_dims(module) == (INTERMEDIATE, HIDDEN)

    tok = loaded.tokenizer
    prompts = ["The capital of France is", "Mozart"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # really padded
    with torch.no_grad():
        logits = loaded.model(**batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        assert torch.isfinite(logits).all()
        # The padded short prompt gives the same logits on its real tokens as when run alone.
        alone = tok([prompts[1]], return_tensors="pt")
        alone_logits = loaded.model(**alone).logits[0]
    n = alone["input_ids"].shape[1]
    if tok.padding_side == "right":
        padded = logits[1, :n]
    else:
        padded = logits[1, -n:]
    torch.testing.assert_close(padded, alone_logits, atol=1e-4, rtol=1e-4)


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"--model .*nope: no such file or directory"):
        load_model(missing)


def test_directory_without_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a Hugging Face model directory \(no config.json\)"):
        load_model(tmp_path)


def test_unsupported_model_type_lists_the_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "'bert' is not supported" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message


def test_corrupt_weights_are_a_one_line_user_error(tmp_path: Path) -> None:
    path = make_tiny_model("gpt2", tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "cannot load the model" in message
    assert "\n" not in message


def test_layer_out_of_range(llama_dir: Path) -> None:
    model = load_model(llama_dir).model
    for bad in (4, -1, 100):
        with pytest.raises(UserError, match=rf"--layer {bad} out of range: model has 4 layers \(0\.\.3\)"):
            find_target_module(model, bad)


def test_default_layer(llama_dir: Path) -> None:
    model = load_model(llama_dir).model
    assert default_layer(model) == 2  # round(0.56 * 3)
    assert default_layer(model, 1.0) == 3  # clamped to the last layer
    assert default_layer(model, 0.0) == 0


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(UserError, match="--dtype int8"):
        resolve_dtype("int8", cpu)
    with pytest.raises(UserError, match="--device banana"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")


def test_fingerprint_same_dir_equal_and_dtype_independent(llama_dir: Path) -> None:
    a = fingerprint(load_model(llama_dir).model)
    b = fingerprint(load_model(llama_dir).model)
    assert set(a) == {"model_type", "config_hash", "weights_hash"}
    assert a["model_type"] == "llama"
    assert a == b and fingerprints_match(a, b)
    # A bf16-loaded copy of the float32 model is the same base model.
    bf16 = fingerprint(load_model(llama_dir, dtype="bfloat16").model)
    assert fingerprints_match(a, bf16)


def test_fingerprint_differs_between_seeds(tmp_path: Path) -> None:
    a = fingerprint(load_model(make_tiny_model("qwen2", tmp_path / "s0", seed=0)).model)
    b = fingerprint(load_model(make_tiny_model("qwen2", tmp_path / "s1", seed=1)).model)
    assert a["config_hash"] == b["config_hash"]
    assert a["weights_hash"] != b["weights_hash"]
    assert not fingerprints_match(a, b)


def test_make_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = fingerprint(load_model(make_tiny_model("opt", tmp_path / "a", seed=3)).model)
    b = fingerprint(load_model(make_tiny_model("opt", tmp_path / "b", seed=3)).model)
    assert a == b


def test_fingerprint_detects_one_modified_weight(llama_dir: Path) -> None:
    model = load_model(llama_dir).model
    before = fingerprint(model)
    _, target = find_target_module(model, 1)
    with torch.no_grad():
        target.weight.view(-1)[0] += 0.5  # flat index 0 is always in the strided sample
    after = fingerprint(model)
    assert after["config_hash"] == before["config_hash"]
    assert after["weights_hash"] != before["weights_hash"]
    assert not fingerprints_match(before, after)


def test_fingerprint_detects_a_config_change(llama_dir: Path) -> None:
    model = load_model(llama_dir).model
    before = fingerprint(model)
    model.config.rms_norm_eps = 1e-3
    after = fingerprint(model)
    assert after["weights_hash"] == before["weights_hash"]
    assert after["config_hash"] != before["config_hash"]
    assert not fingerprints_match(before, after)


def test_fingerprints_match_needs_all_fields() -> None:
    fp = {"model_type": "llama", "config_hash": "c", "weights_hash": "w"}
    assert fingerprints_match(fp, dict(fp))
    assert not fingerprints_match(fp, {**fp, "weights_hash": "x"})
    assert not fingerprints_match({}, {})


def _strip_special(path: Path, *, keep_eos: bool) -> None:
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    if not keep_eos:
        tok.eos_token = None
    tok.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.pad_token is None
    assert (reloaded.eos_token is not None) == keep_eos


def test_missing_pad_token_becomes_eos(tmp_path: Path) -> None:
    path = make_tiny_model("gpt_neox", tmp_path / "m")
    _strip_special(path, keep_eos=True)
    loaded = load_model(path)
    tok = loaded.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    batch = tok(["The capital of Peru is", "Lima"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()


def test_missing_pad_and_eos_token_becomes_unk(tmp_path: Path) -> None:
    path = make_tiny_model("mistral", tmp_path / "m")
    _strip_special(path, keep_eos=False)
    tok = load_model(path).tokenizer
    assert tok.pad_token == tok.unk_token == "<unk>"


def test_peft_wrapped_model_still_finds_layers(llama_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_model(llama_dir).model
    wrapped = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    assert num_layers(wrapped) == 4
    name, module = find_target_module(wrapped, 1)
    assert name.endswith("model.layers.1.mlp.down_proj")
    assert module_dims(module) == (INTERMEDIATE, HIDDEN)


def test_device_map_places_model_and_reports_input_device(llama_dir: Path) -> None:
    loaded = load_model(llama_dir, device_map="cpu")
    assert loaded.device == torch.device("cpu")
    assert fingerprints_match(fingerprint(loaded.model), fingerprint(load_model(llama_dir).model))


def test_chat_without_a_template_is_one_line(tmp_path: Path) -> None:
    from moecli.model.batching import chat_prompt

    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    with pytest.raises(UserError, match="^--chat: this model's tokenizer has no chat template; drop --chat$"):
        chat_prompt(loaded.tokenizer, "Alice Moreau was born in")
