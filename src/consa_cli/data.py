"""Calibration and evaluation text for consa, tokenized and packed into fixed-length sequences.

Text comes from the embedded English Wikipedia excerpt (the default), a local ``.txt``/``.jsonl``/``.json``/
``.parquet`` file or a directory of them, or a Hugging Face Hub dataset. Documents are tokenized and joined
into one token stream with EOS between them; the stream is cut once, the head being the calibration split
and the tail the evaluation split, so the two never share a token.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_CORPUS = "embedded:enwiki"
SPLITS = ("calibration", "evaluation")

# The excerpt ships as test data inside gensim's wheel: the first 211 pages of a 2016 English Wikipedia dump
# (CC BY-SA), of which 101 are articles once redirects, a project page and disambiguation pages are left out.
# Every 4.4.0 wheel carries the same file, so one fixed platform is pinned (the download then works from any
# interpreter or OS), and the checksum guards against a corrupt or substituted wheel.
_GENSIM = "gensim==4.4.0"
_WHEEL_GLOB = "gensim-4.4.0-*.whl"
_PIP_DOWNLOAD = (
    "download", "--no-deps", "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", _GENSIM,
)  # fmt: skip
_WHEEL_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WHEEL_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_CORPUS_FILE = "enwiki-excerpt.jsonl"

_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_ACCEPTED = "/".join(_LOADERS)
# Documents per tokenizer call: batching is what makes fast tokenizers fast; bounding it bounds memory.
_TOKENIZE_BATCH = 64
# Part of the token-cache key; bump it when the stream layout changes so stale caches are never read.
_STREAM_FORMAT = 1

# Media and category links and these tags are not prose: captions, citations, gallery lists and tables.
_NON_PROSE_LINKS = ("file:", "image:", "category:")
_NON_PROSE_TAGS = {"ref", "gallery", "table"}
# What mwparserfromhell leaves as literal text where the markup around it was malformed.
_LEFTOVER_REF = re.compile(r"<ref[^>]*?(?:/>|>.*?</ref>)", re.DOTALL)
_LEFTOVER_TAG = re.compile(r"</?[A-Za-z][^<>\n]*>")
_DEBRIS_LINE = re.compile(r"^(?:category:|file:|image:|[{|!])|thumb\|", re.IGNORECASE)


class DataError(ValueError):
    """Calibration or evaluation data cannot be had; the message is one line meant for the user."""


def cache_root() -> Path:
    """Where consa keeps downloads and derived files: ``$CONSA_CACHE``, else ``~/.cache/consa``."""
    return Path(os.environ.get("CONSA_CACHE") or Path.home() / ".cache" / "consa").expanduser()


def embedded_corpus_path(cache_dir: Path | None = None) -> Path:
    """The embedded Wikipedia excerpt as JSONL (one ``{"title", "text"}`` object per article).

    Built once under ``cache_dir`` (default :func:`cache_root`) from the gensim 4.4.0 wheel found in, or
    downloaded with pip to, ``<cache_dir>/wheels``; later calls return the cached file.
    """
    root = cache_root() if cache_dir is None else Path(cache_dir)
    path = root / "corpus" / _CORPUS_FILE
    if path.is_file():
        return path
    articles = _extract_articles(_gensim_wheel(root / "wheels"))
    lines = "".join(json.dumps({"title": t, "text": x}, ensure_ascii=False) + "\n" for t, x in articles)
    _replace_atomically(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    return path


def load_documents(data: str) -> list[str]:
    """The non-empty documents of ``data``.

    ``data`` is :data:`EMBEDDED_CORPUS`; a local file (a ``.txt`` file is one document, ``.jsonl``/``.json``
    records and ``.parquet`` rows give their ``text`` field); a directory, read recursively for such files;
    or a Hub dataset id ``name`` or ``name:config``, whose ``train`` split's ``text`` column is used.
    """
    if data == EMBEDDED_CORPUS:  # our own JSONL: read directly, no need for the datasets library
        lines = embedded_corpus_path().read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]
    files = _local_files(data)
    texts = _read_hub(data) if files is None else [text for path in files for text in _read_file(path)]
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise DataError(f"{data} contains no text")
    return texts


def load_token_sequences(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    split: str,
    max_sequences: int | None = None,
    eval_fraction: float = 0.2,
) -> torch.LongTensor:
    """Consecutive, non-overlapping ``seq_len``-token windows of one split of ``data``, as ``[N, seq_len]``.

    All documents form one token stream (``tokenizer.eos_token_id`` between documents when the tokenizer
    has one); its first ``1 - eval_fraction`` is the ``"calibration"`` split and the rest the
    ``"evaluation"`` split. The tail of a split shorter than ``seq_len`` is dropped, and at most
    ``max_sequences`` windows are kept, from the start of the split. The stream is cached under
    ``cache_root()/tokens`` for tokenizers that have a ``name_or_path``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of: {', '.join(SPLITS)}")
    if seq_len < 1:
        raise DataError(f"--seq-len must be at least 1, got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise DataError(f"the number of sequences must be at least 1, got {max_sequences}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"the evaluation fraction must lie strictly between 0 and 1, got {eval_fraction}")
    stream = _token_stream(data, tokenizer)
    cut = round(len(stream) * (1 - eval_fraction))
    tokens = stream[:cut] if split == "calibration" else stream[cut:]
    count = len(tokens) // seq_len
    if count == 0:
        raise DataError(
            f"the {split} split of {data} has {len(tokens)} tokens, fewer than --seq-len {seq_len}; "
            "lower --seq-len or pass more data"
        )
    if max_sequences is not None:
        count = min(count, max_sequences)
    return tokens[: count * seq_len].view(count, seq_len).long()


def _local_files(data: str) -> list[Path] | None:
    """The files that ``data`` names, or ``None`` when it names a Hub dataset."""
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOADERS)
        if not files:
            raise DataError(f"directory {path} holds no {_ACCEPTED} files")
        return files
    if path.is_file():
        if path.suffix.lower() not in _LOADERS:
            raise DataError(
                f"unsupported file type '{path.suffix or path.name}' ({path}); accepted: {_ACCEPTED}"
            )
        return [path]
    # A Hub id is "name" or "owner/name"; anything else that names no existing file is a mistyped path.
    if path.suffix.lower() in _LOADERS or data.startswith((".", "/", "~")) or data.count("/") > 1:
        raise DataError(f"no such file or directory: {data}")
    return None


def _read_file(path: Path) -> list[str]:
    import datasets  # imported here: it is slow to import and only needed once data is read

    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    loader = _LOADERS[path.suffix.lower()]
    options = {"sample_by": "document"} if loader == "text" else {}
    try:
        # Local conversions go to consa's cache so they do not pile up in the user's Hub dataset cache.
        dataset = datasets.load_dataset(
            loader, data_files=str(path), split="train", cache_dir=str(cache_root() / "datasets"), **options
        )
    except Exception as exc:  # datasets raises many unrelated types for unreadable files
        raise DataError(f"cannot read {path}: {_first_line(exc)}") from exc
    return _text_column(dataset, str(path))


def _read_hub(data: str) -> list[str]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    name, _, config = data.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except ConnectionError as exc:
        raise DataError(
            f"dataset '{data}' is not cached and the hub is unreachable; pass a local {_ACCEPTED} file"
        ) from exc
    except DatasetNotFoundError as exc:
        raise DataError(
            f"dataset '{data}' is neither a local file nor a Hub dataset ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # config, permission and format errors all surface as one line
        raise DataError(f"cannot load dataset '{data}': {_first_line(exc)}") from exc
    return _text_column(dataset, f"dataset '{data}'")


def _text_column(dataset, source: str) -> list[str]:
    if "text" not in dataset.column_names:
        raise DataError(f"{source} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return list(dataset["text"])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _token_stream(data: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents of ``data`` as one int32 token stream, from the cache when possible."""
    key = _stream_key(data, tokenizer)
    path = None if key is None else cache_root() / "tokens" / f"{key}.safetensors"
    if path is not None and path.is_file():
        return load_file(path)["tokens"]
    documents = load_documents(data)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces = []
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        # verbose=False: whole documents are longer than model_max_length by design; the warning is noise.
        batch = tokenizer(documents[start : start + _TOKENIZE_BATCH], add_special_tokens=False, verbose=False)
        for ids in batch["input_ids"]:
            pieces.append(torch.tensor((separator if pieces else []) + ids, dtype=torch.int32))
    stream = torch.cat(pieces)
    if path is not None:
        _replace_atomically(
            path, lambda tmp: save_file({"tokens": stream}, str(tmp), metadata={"data": data})
        )
    return stream


def _stream_key(data: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Cache key of the token stream, or ``None`` for a tokenizer without a name to key it by."""
    name = getattr(tokenizer, "name_or_path", "")
    if not name:
        return None
    files = _local_files(data)
    # Files are keyed by size and mtime so an edited file is re-read; a Hub id names a cached snapshot.
    source = data if files is None else [[str(p.resolve()), *_stat(p)] for p in files]
    identity = {
        "format": _STREAM_FORMAT,
        "data": source,
        "tokenizer": [str(name), type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _gensim_wheel(wheel_dir: Path) -> Path:
    """A gensim 4.4.0 wheel in ``wheel_dir``, downloaded with pip when none is there."""
    found = sorted(wheel_dir.glob(_WHEEL_GLOB))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    hint = f"run `pip {' '.join(_PIP_DOWNLOAD)} -d {wheel_dir}` or pass --data with a local {_ACCEPTED} file"
    try:
        # A fixed command: nothing in it comes from the user.
        subprocess.run(
            [sys.executable, "-m", "pip", *_PIP_DOWNLOAD, "-d", str(wheel_dir)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        reason = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines() or ["pip failed"]
        raise DataError(
            f"cannot download the {_GENSIM} wheel holding the embedded corpus ({reason[-1]}); {hint}"
        ) from exc
    found = sorted(wheel_dir.glob(_WHEEL_GLOB))
    if not found:
        raise DataError(f"pip downloaded no {_GENSIM} wheel into {wheel_dir}; {hint}")
    return found[0]


def _extract_articles(wheel: Path) -> list[tuple[str, str]]:
    """``(title, plain text)`` of every article in the wheel's Wikipedia dump excerpt."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            compressed = archive.read(_WHEEL_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel} is not a usable {_GENSIM} wheel ({exc}); delete it and retry") from exc
    if hashlib.sha256(compressed).hexdigest() != _WHEEL_MEMBER_SHA256:
        raise DataError(
            f"the Wikipedia excerpt in {wheel} does not match gensim 4.4.0's; delete the wheel and retry"
        )
    articles = []
    for _, element in ET.iterparse(bz2.BZ2File(io.BytesIO(compressed))):
        if element.tag.rpartition("}")[2] != "page":
            continue
        title = element.findtext("{*}title") or ""
        wikitext = element.findtext("{*}revision/{*}text")
        # Namespace 0 holds articles; redirects and disambiguation pages are link lists, not prose.
        is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
        if is_article and wikitext and not title.endswith("(disambiguation)"):
            text = _plain_text(wikitext)
            if text:
                articles.append((title, text))
        element.clear()  # keeps memory flat while iterating the dump
    return articles


def _plain_text(wikitext: str) -> str:
    """Readable prose of one article's wikitext."""
    import mwparserfromhell  # imported here: only the one-time corpus extraction needs it

    code = mwparserfromhell.parse(wikitext)
    _drop_non_prose(code)
    text = _LEFTOVER_TAG.sub("", _LEFTOVER_REF.sub("", code.strip_code()))
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if not _DEBRIS_LINE.search(line))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _drop_non_prose(code) -> None:
    """Remove media/category links and non-prose tags from parsed wikitext, in place.

    Rebuilding each node list is linear; ``Wikicode.remove`` searches the whole tree for every node removed,
    which made extraction about three times slower.
    """
    from mwparserfromhell.nodes import Tag, Wikilink

    kept = []
    for node in code.nodes:
        if isinstance(node, Wikilink) and str(node.title).strip().lower().startswith(_NON_PROSE_LINKS):
            continue
        if isinstance(node, Tag):
            if str(node.tag).strip().lower() in _NON_PROSE_TAGS:
                continue
            if node.contents is not None:
                _drop_non_prose(node.contents)
        kept.append(node)
    code.nodes[:] = kept


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Create ``path`` through ``write(temporary path)`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (os.replace is atomic only within one file system); not mkstemp,
    # whose 0600 mode would make a shared cache unreadable to others.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
