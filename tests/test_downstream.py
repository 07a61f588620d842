"""Downstream tasks through lm-evaluation-harness: a local multiple-choice task, offline, on the tiny model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import TOKENIZER_WORDS

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention
from consa_cli.downstream import DownstreamError, load_tasks
from consa_cli.evaluate import EvalSettings, evaluate, resolve_target
from consa_cli.models import load_model_and_tokenizer, model_fingerprint

TASK = "consa_tiny_choice"


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread, monkeypatch, tmp_path):
    """Out of the real consa cache, on one torch thread; datasets' cache in tmp and no hub look-ups."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def documents(answers: list[int] | None = None, count: int = 6) -> list[dict]:
    """Seeded three-choice questions in the tiny vocabulary; ``answers`` (default: 0, 1, 2, 0, ...)."""
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, len(TOKENIZER_WORDS), (count, 8), generator=generator).tolist()
    return [{"question": " ".join(TOKENIZER_WORDS[w] for w in row[:5]),
             "choices": [TOKENIZER_WORDS[w] for w in row[5:]],
             "answer": answers[index] if answers else index % 3}
            for index, row in enumerate(words)]


def write_documents(path, answers: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(doc) + "\n" for doc in documents(answers)))


def write_task(directory, data_file) -> None:
    """An lm-eval multiple-choice task over a local JSON-lines file (data paths are absolute)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "data" / "docs.jsonl"
    write_documents(data)
    write_task(tmp_path / "tasks", data)
    return tmp_path / "tasks"


def reference_choices(model, tokenizer) -> list[int]:
    """Multiple-choice answers computed by hand: the choice whose token is likeliest after the question."""
    picks = []
    for doc in documents():
        context = tokenizer(doc["question"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_probs = model(input_ids=context).logits[0, -1].log_softmax(-1)
        choice_ids = [tokenizer(choice)["input_ids"][0] for choice in doc["choices"]]
        picks.append(int(torch.stack([log_probs[i] for i in choice_ids]).argmax()))
    return picks




def test_missing_harness_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(DownstreamError, match=r"--tasks needs lm-evaluation-harness: pip install 'consa-cli\[lmeval\]'"):
        load_tasks(["arc_easy"])


def test_local_task_scores_dense_and_hybrids(tmp_path, local_task, tiny_model_dir, tiny_text_file):
    pytest.importorskip("lm_eval")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.float32)
    dense_picks = reference_choices(model, tokenizer)
    with hybrid_attention(model, torch.zeros(4, 2), sliding_window=2, sink_tokens=0):
        sliding_picks = reference_choices(model, tokenizer)
    # The dense model's picks as the answers: it scores 1, the all-sliding hybrid only where it picks the same.
    write_documents(tmp_path / "data" / "docs.jsonl", dense_picks)
    sliding_accuracy = sum(map(int.__eq__, sliding_picks, dense_picks)) / len(dense_picks)
    assert sliding_accuracy < 1
    for name, full in (("all-full", True), ("all-sliding", False)):
        (tmp_path / name).mkdir()
        Allocation(torch.full((4, 2), full), "layer", 2, 0, model=str(tiny_model_dir),
                   model_fingerprint=model_fingerprint(model)).save(tmp_path / name / "allocation.safetensors")
    settings = EvalSettings(data=str(tiny_text_file), seq_lens=[16], max_sequences=2, dtype="float32",
                            tasks=[TASK], tasks_include=str(local_task))

    dense, all_full, all_sliding = evaluate([resolve_target(str(tmp_path / "all-full")),
                                             resolve_target(str(tmp_path / "all-sliding"))], settings)

    assert set(dense["tasks"]) == {TASK}
    metrics = dense["tasks"][TASK]
    assert {"acc", "acc_stderr"} <= set(metrics)
    assert metrics["acc"] == 1.0  # the model consa holds, scored in memory
    assert all_full["tasks"] == dense["tasks"]  # an all-full allocation is the dense model
    assert all_sliding["tasks"][TASK]["acc"] == pytest.approx(sliding_accuracy)  # the hybrid, applied


@pytest.mark.parametrize(("names", "message"), [
    (["no_such_task_anywhere"], "unknown lm-eval task 'no_such_task_anywhere'"),
    ([], "at least one task"),
])
def test_bad_task_names(local_task, names, message):
    pytest.importorskip("lm_eval")
    with pytest.raises(DownstreamError, match=message):
        load_tasks(names, local_task)


def test_unloadable_task_data_is_one_clear_error(tmp_path):
    pytest.importorskip("lm_eval")
    write_task(tmp_path / "tasks", tmp_path / "missing.jsonl")  # as if the data could not be fetched
    with pytest.raises(DownstreamError, match=f"cannot load the data of {TASK} .*--tasks-include"):
        load_tasks([TASK], tmp_path / "tasks")
    with pytest.raises(DownstreamError, match="must be a directory"):
        load_tasks([TASK], tmp_path / "no-such-dir")


def test_eval_command_runs_local_tasks(tmp_path, local_task, tiny_model_dir, tiny_text_file):
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from consa_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(tiny_text_file), "--seq-len", "16",
                                 "--max-sequences", "2", "--dtype", "float32", "--tasks", TASK, "--tasks-include",
                                 str(local_task), "--tasks-limit", "3", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "lm-evaluation-harness" in result.stdout and f"{TASK}" in result.stdout
    row = json.loads((tmp_path / "eval.json").read_text())["rows"][0]
    assert row["tasks"][TASK]["sample_len"] == 3  # --tasks-limit documents

    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks-limit", "3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --tasks-include, --tasks-limit and --tasks-fewshot need --tasks"


def test_sweep_command_runs_local_tasks_on_every_allocation(tmp_path, local_task, tiny_model_dir, tiny_text_file):
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from consa_cli.cli import app

    runner = CliRunner()
    output = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--sparsities", "0.5", "--model", str(tiny_model_dir), "--data",
                                 str(tiny_text_file), "--seq-len", "32", "--window", "4", "--steps", "2",
                                 "--dtype", "float32", "--granularity", "kv-head", "--max-sequences", "2",
                                 "--no-report", "--tasks", TASK, "--tasks-include", str(local_task),
                                 "--tasks-limit", "2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "lm-evaluation-harness" in result.stdout
    rows = json.loads((output / "eval.json").read_text())["rows"]
    assert len(rows) == 3  # dense, the learned allocation, the interleaved rule: each scored on the task
    assert all(row["tasks"][TASK]["sample_len"] == 2 for row in rows)

    result = runner.invoke(app, ["sweep", "--sparsities", "0.5", "--tasks-fewshot", "1", "--output",
                                 str(tmp_path / "other")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --tasks-include, --tasks-limit and --tasks-fewshot need --tasks"
    assert not (tmp_path / "other").exists()
