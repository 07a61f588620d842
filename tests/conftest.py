"""Shared fixtures: tiny random models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)

FAMILY_CONFIGS = {
    "qwen3": lambda **kw: Qwen3Config(**{**SMALL, "head_dim": 16, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**SMALL, **kw}),
    "llama": lambda **kw: LlamaConfig(**{**SMALL, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**SMALL, "sliding_window": None, **kw}),
    "gemma3_text": lambda **kw: Gemma3TextConfig(**{**SMALL, "head_dim": 16, "sliding_window": 8,
                                                    "query_pre_attn_scalar": 16, **kw}),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_model(family: str, seed: int = 0, **config_overrides):
    """A tiny random model of ``family`` in float32 eval mode."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family](**config_overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# --- saved checkpoints for export / eval / CLI tests ------------------------------------------------------

TOKENIZER_WORDS = [f"w{i}" for i in range(2, 96)]  # ids 2..95: with <unk> and <eos> exactly vocab_size=96


def tiny_tokenizer():
    """Offline word-level tokenizer over the tiny models' 96-token vocabulary (``<unk>`` 0, ``<eos>`` 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{word: i for i, word in enumerate(TOKENIZER_WORDS, start=2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_tiny(path, family: str = "qwen3", seed: int = 0, **config_overrides):
    """Save a tiny random ``family`` model and the tiny tokenizer as a checkpoint directory; returns the model."""
    model = tiny_model(family, seed=seed, **config_overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def tiny_text(words: int = 2000, seed: int = 0) -> str:
    """Random text in the tiny tokenizer's vocabulary: one token per word, lines of 20 words."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(TOKENIZER_WORDS), (words,), generator=generator).tolist()
    lines = [" ".join(TOKENIZER_WORDS[i] for i in picks[start : start + 20]) for start in range(0, words, 20)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """One saved tiny qwen3 checkpoint (with tokenizer), shared read-only by the whole session."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    save_tiny(path, "qwen3")
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    """A .txt file of 2000 tokens under the tiny tokenizer: 50 calibration and 12 evaluation 32-token sequences."""
    path = tmp_path_factory.mktemp("tiny-data") / "text.txt"
    path.write_text(tiny_text())
    return path


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("consa-cache")


@pytest.fixture
def isolated_consa_cache(monkeypatch, session_cache_dir):
    """Point consa's cache (token streams, dataset conversions) at a session-wide temporary directory."""
    monkeypatch.setenv("CONSA_CACHE", str(session_cache_dir))
    return session_cache_dir


@pytest.fixture
def ctrl_c_delivered():
    """SIGINT raising KeyboardInterrupt, as in a terminal, for tests that interrupt themselves: a test run started in
    the background (``&``, nohup) inherits SIGINT ignored, and consa rightly leaves an ignored SIGINT alone."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models gain nothing from more, and lose a lot when other work holds the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- character-level tokenizer for retrieval prompts ------------------------------------------------------

CHAR_TOKENIZER_CHARS = " \n.,?:=-'" + "0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def tiny_char_tokenizer():
    """Offline one-token-per-character tokenizer (``<unk>`` 0, ``<eos>`` 1, 73 ids: fits the tiny models).

    Retrieval prompts mix prose, digits and upper-case names, which the word-level tiny tokenizer maps to
    ``<unk>``; here every character keeps its identity, and token positions equal text positions.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{char: i for i, char in enumerate(CHAR_TOKENIZER_CHARS, start=2)}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def char_tokenizer():
    return tiny_char_tokenizer()


def bench_module(name: str, monkeypatch=None):
    """A script of bench/ imported as a module (``bench/NAME.py``); with ``monkeypatch``, bench/ is also on the
    import path for the test, for scripts that import their neighbours."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / f"{name}.py"
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
