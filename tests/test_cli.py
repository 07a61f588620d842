"""The command line: search -> export -> eval -> show end to end, and one-line errors that write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model
from transformers import GPT2Config
from typer.testing import CliRunner

from consa_cli.allocation import Allocation
from consa_cli.cli import app
from consa_cli.settings import fraction

SEARCH = ["--seq-len", "32", "--window", "8", "--steps", "1"]
runner = CliRunner()  # click >= 8.2 keeps stderr apart: result.stdout, result.stderr


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread, monkeypatch):
    """Out of the real consa cache, on one torch thread; progress-bar settings restored afterwards."""
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))


def invoke(*args: str | Path):
    return runner.invoke(app, [str(arg) for arg in args])


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_search_export_eval_show_end_to_end(tmp_path, tiny_model_dir, tiny_text_file):
    run_dir, export_dir, json_path = tmp_path / "run", tmp_path / "exp", tmp_path / "out" / "eval.json"

    result = invoke("search", "--model", tiny_model_dir, "--data", tiny_text_file, "--seq-len", "32", "--window", "8",
                    "--steps", "3", "--sparsity", "0.5", "--output", run_dir)
    assert result.exit_code == 0, result.output
    assert "learned kv-head allocation: 4/8 units full attention (sparsity 0.500)" in result.stdout
    assert "KL teacher: 3 forwards run, 0 read from the cache." in result.stdout  # no sequence visited twice
    assert result.stderr == ""  # no library progress bars around consa's own output
    assert {p.name for p in run_dir.iterdir()} == {"allocation.safetensors", "checkpoint.safetensors", "metrics.jsonl", "run.json"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2, 3]
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["settings"]["steps"] == 3 and summary["sink_tokens"] == 4  # qwen3's default sinks
    allocation = Allocation.load(run_dir)
    assert (allocation.num_full_units, allocation.num_units, allocation.model) == (4, 8, str(tiny_model_dir))

    result = invoke("export", run_dir, "--output", export_dir)
    assert result.exit_code == 0, result.output
    assert "load it with consa_cli.load_hybrid(path)" in result.stdout
    config = json.loads((export_dir / "config.json").read_text())
    assert config["consa"]["loader"] == "consa" and config["consa"]["source_model"] == str(tiny_model_dir)
    assert (export_dir / "consa_mask.safetensors").is_file() and (export_dir / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    result = invoke("eval", export_dir, "--data", tiny_text_file, "--seq-len", "32", "--max-sequences", "2",
                    "--json", json_path)
    assert result.exit_code == 0, result.output
    assert f"wrote {json_path}" in result.stdout and "held-out perplexity" in result.stdout
    written = json.loads(json_path.read_text())
    assert written["settings"]["seq_lens"] == [32] and written["settings"]["max_sequences"] == 2
    # The export's config names its source model, which becomes the dense reference row.
    assert [(row["label"], row["kind"], row["sequences"]) for row in written["rows"]] == [
        (f"dense ({tiny_model_dir})", "model", 2), ("exp", "export", 2)]
    assert written["rows"][0]["is_reference"] and "delta_nll_vs_dense" in written["rows"][1]
    assert written["rows"][1]["full_units"] == 4

    result = invoke("show", export_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == allocation.describe()
    assert result.stdout.splitlines()[2:] == [f"{i:>5}  {row}" for i, row in enumerate(allocation.render_rows())]
    assert invoke("show", run_dir).stdout == result.stdout  # a run directory shows the same mask
    picture = tmp_path / "mask.png"
    result = invoke("show", run_dir, "--png", picture)
    assert result.exit_code == 0 and picture.read_bytes()[:4] == b"\x89PNG"


def test_eval_of_a_run_dir_adds_the_dense_reference(tmp_path, tiny_model_dir, tiny_text_file):
    result = invoke("baseline", "--rule", "bottom", "--model", tiny_model_dir, "--sparsity", "0.5", "--window",
                    "4", "--output", tmp_path / "rule")
    assert result.exit_code == 0, result.output
    assert "rule:bottom layer allocation: 2/4 units full attention" in result.stdout
    result = invoke("eval", tmp_path / "rule", "--data", tiny_text_file, "--seq-len", "32", "--max-sequences", "2",
                    "--dtype", "float32", "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["label"] for row in rows] == [f"dense ({tiny_model_dir})", "rule"]
    assert rows[0]["is_reference"] and rows[1]["delta_nll_vs_dense"] > 0
    assert "perplexity by query position" in result.stdout and "[4, 8)" in result.stdout
    assert [(b["start"], b["end"]) for b in rows[1]["position_buckets"]] == [(0, 4), (4, 8), (8, 16), (16, 31)]


def test_eval_applies_an_allocation_to_a_moved_model_with_model_and_refuses_another(tmp_path, tiny_model_dir,
                                                                                    tiny_text_file):
    """An allocation names the path of the machine it was made on: there, eval says so and points at --model;
    --model applies it to a copy elsewhere (same weights, same fingerprint), and refuses a different model."""
    import shutil

    from conftest import save_tiny

    moved = tmp_path / "made-here"
    shutil.copytree(tiny_model_dir, moved)
    result = invoke("baseline", "--rule", "bottom", "--model", moved, "--sparsity", "0.5", "--window", "4",
                    "--output", tmp_path / "rule")
    assert result.exit_code == 0, result.output
    shutil.rmtree(moved)  # the allocation now names a path that does not exist
    common = ["--data", tiny_text_file, "--seq-len", "32", "--max-sequences", "2", "--dtype", "float32"]

    result = invoke("eval", tmp_path / "rule", *common)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"no such file or directory: {moved}" in result.stderr and "pass --model" in result.stderr

    result = invoke("eval", tmp_path / "rule", "--model", tiny_model_dir, *common, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["label"] for row in rows] == [f"dense ({tiny_model_dir})", "rule"]
    assert rows[1]["delta_nll_vs_dense"] > 0  # paired with the dense copy: the same weights

    save_tiny(tmp_path / "other", seed=1)
    result = invoke("eval", tmp_path / "rule", "--model", tmp_path / "other", *common)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "made for another model" in result.stderr


def test_eval_says_which_reference_it_took_when_the_targets_name_different_models(tmp_path, tiny_model_dir,
                                                                                  tiny_text_file):
    """Allocation files name their model; when two name different ones (the unhealed mask and a mask recorded for
    healed weights, say), the first target's model is every row's reference, and eval says so once."""
    from conftest import save_tiny

    save_tiny(tmp_path / "other", seed=1)
    for name, model in (("mine", tiny_model_dir), ("theirs", tmp_path / "other")):
        result = invoke("baseline", "--rule", "bottom", "--model", model, "--sparsity", "0.5", "--window", "4",
                        "--output", tmp_path / name)
        assert result.exit_code == 0, result.output
    common = ["--data", tiny_text_file, "--seq-len", "32", "--max-sequences", "2", "--dtype", "float32"]
    result = invoke("eval", tmp_path / "theirs", tmp_path / "mine", *common)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("note: the targets were made from 2 different models") == 1
    assert f"compared with {tmp_path / 'other'}, the first target's" in " ".join(result.stderr.split())
    result = invoke("eval", tmp_path / "mine", *common)  # one model: nothing to say
    assert result.exit_code == 0 and "note:" not in result.stderr
    result = invoke("eval", tmp_path / "theirs", tmp_path / "mine", *common, "--dense-model", tiny_model_dir)
    assert result.exit_code == 0 and "note:" not in result.stderr


def test_eval_report_compares_several_allocations(tmp_path, tiny_model_dir, tiny_text_file):
    pytest.importorskip("matplotlib")
    for rule, sparsity in (("bottom", "0.5"), ("top", "1/2"), ("top", "0.75")):  # a ratio works as well
        result = invoke("baseline", "--rule", rule, "--model", tiny_model_dir, "--sparsity", sparsity, "--window",
                        "4", "--output", tmp_path / f"{rule}-{fraction(sparsity):g}")
        assert result.exit_code == 0, result.output
    result = invoke("eval", tmp_path / "bottom-0.5", tmp_path / "top-0.5", tmp_path / "top-0.75", "--data",
                    tiny_text_file, "--seq-len", "32", "--max-sequences", "2", "--dtype", "float32", "--report",
                    tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'report' / 'report.md'}" in result.stdout.replace("\n", "")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| top-0.75 | rule:top layer | 1/4 | 0.750 |" in text
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == {
        "delta-nll-32.png", "delta-nll-beyond-window-32.png", "masks-sparsity-0.5.png", "masks-sparsity-0.75.png"}


def _bad_inputs() -> dict[str, tuple]:
    """name -> (build(tmp_path, model_dir, data_file) -> argv, expected error fragment)."""

    def search(*extra, data=None, model=None):
        def build(tmp, model_dir, data_file):
            return ["search", "--model", model(tmp) if model else model_dir,
                    "--data", data(tmp) if data else data_file, *SEARCH, "--output", tmp / "new" / "run", *extra]
        return build

    def write(name, content: str | bytes):
        def make(tmp):
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
            return path
        return make

    def gpt2_dir(tmp):
        GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp / "gpt2")
        return tmp / "gpt2"

    def empty_dir(tmp):
        (tmp / "not-a-checkpoint").mkdir()
        return tmp / "not-a-checkpoint"

    def recipe(content):
        return lambda tmp, model_dir, data_file: search()(tmp, model_dir, data_file) + [
            "--recipe", write("recipe.yaml", content)(tmp)]

    def existing_run(tmp, model_dir, data_file):
        write("run/allocation.safetensors", b"an older run")(tmp)
        return ["search", "--model", model_dir, "--data", data_file, *SEARCH, "--output", tmp / "run"]

    def valid_run(tmp):
        Allocation(torch.ones(4, 2, dtype=torch.bool), "layer", 4, 0, model=str(tmp / "gone")).save(
            tmp / "run" / "allocation.safetensors")
        return tmp / "run"

    def truncated_run(tmp, model_dir):
        path = tmp / "run" / "allocation.safetensors"
        Allocation(torch.ones(4, 2, dtype=torch.bool), "layer", 4, 0, model=str(model_dir)).save(path)
        path.write_bytes(path.read_bytes()[:-5])
        return tmp / "run"

    def other_model_run(tmp, model_dir):  # 3 layers: made for some other model than the 4-layer tiny one
        Allocation(torch.ones(3, 2, dtype=torch.bool), "layer", 4, 0, model=str(model_dir)).save(
            tmp / "run" / "allocation.safetensors")
        return tmp / "run"

    def export(run, *extra, existing=False):
        def build(tmp, model_dir, data_file):
            if existing:
                write("exp/config.json", "{}")(tmp)
            return ["export", run(tmp) if callable(run) else tmp / run, "--output", tmp / "exp", *extra]
        return build

    def eval_(*extra, target=None):
        return lambda tmp, model_dir, data_file: ["eval", target(tmp) if target else model_dir, "--data", data_file,
                                                  "--json", tmp / "eval.json", *extra]

    return {
        "sparsity-above-1": (search("--sparsity", "1.5"), "--sparsity must be between 0 and 1, got 1.5"),
        "granularity-head": (search("--granularity", "head"), "--granularity must be one of"),
        "loss-mse": (search("--loss", "mse"), "--loss must be one of kl, lm, got 'mse'"),
        "window-not-below-seq-len": (search("--window", "32"), "--window (32) must be smaller than --seq-len (32)"),
        "steps-0": (search("--steps", "0"), "--steps must be at least 1, got 0"),
        "seeds-0": (search("--seeds", "0"), "--seeds must be at least 1, got 0"),
        "seeds-negative": (search("--seeds", "-2"), "--seeds must be at least 1, got -2"),
        "negative-sinks": (search("--sink-tokens", "-1"), "--sink-tokens must be >= 0"),
        "dtype-int8": (search("--dtype", "int8"), "--dtype must be one of"),
        "unknown-model-path": (search(model=lambda tmp: tmp / "no-such-model"), "no such file or directory"),
        "dir-without-config": (search(model=empty_dir), "has no config.json"),
        "unsupported-family": (search(model=gpt2_dir), "model type 'gpt2' is not supported"),
        "missing-data-file": (search(data=lambda tmp: tmp / "missing.txt"), "no such file or directory"),
        "data-extension": (search(data=write("data.csv", "a,b\n")), "unsupported file type '.csv'"),
        "empty-data-file": (search(data=write("empty.txt", "")), "is empty"),
        "data-shorter-than-seq-len": (search(data=write("short.txt", "w2 w3 w4\n")), "fewer than --seq-len 32"),
        "per-layer-sparsity-not-exact": (search("--granularity", "kv-head-per-layer", "--sparsity", "0.25"),
                                         "same whole number of sliding heads"),
        "existing-run-without-force": (existing_run, "already holds a run; pass --force"),
        "recipe-unknown-key": (recipe("sparsity: 0.5\nwindw: 8\n"), "unknown settings: windw"),
        "recipe-missing": (lambda tmp, m, d: search()(tmp, m, d) + ["--recipe", tmp / "nope.yaml"],
                           "recipe not found"),
        "recipe-not-a-mapping": (recipe("- sparsity\n"), "must be a mapping"),
        "recipe-wrong-type": (recipe("gate_lr: fast\n"), "setting 'gate_lr' must be float, got 'fast'"),
        "export-missing-run": (export("no-such-run"), "no allocation file at"),
        "export-corrupt-allocation": (export(write("run/allocation.safetensors", b"garbage")),
                                      "is not a readable safetensors allocation file"),
        "export-existing-output": (export(valid_run, existing=True), "already exists; pass --force"),
        "export-model-gone": (export(valid_run), "no such file or directory"),
        "search-unknown-retrieval-format": (search("--retrieval-formats", "room-code,passkey"),
                                            "--retrieval-formats: unknown calibration format 'passkey'"),
        "search-unknown-calibration-haystack": (search("--calibration-haystack", "noise"),
                                                "--calibration-haystack must be one of text, filler, got 'noise'"),
        "sweep-unknown-calibration-haystack": (lambda tmp, m, d: ["sweep", "--model", m, "--sparsities", "0.5",
                                                                  "--calibration-haystack", "prose", "--output",
                                                                  tmp / "sweep"],
                                               "--calibration-haystack must be one of text, filler, got 'prose'"),
        "search-unknown-retrieval-filter": (search("--retrieval-filter", "correct"),
                                            "--retrieval-filter must be one of none, answered, got 'correct'"),
        "eval-seq-len-1": (eval_("--seq-len", "1"), "--seq-len must be >= 2"),
        "eval-dtype": (eval_("--dtype", "int8"), "--dtype must be one of"),
        "eval-max-sequences-0": (eval_("--max-sequences", "0"), "--max-sequences and --batch-size >= 1"),
        "eval-corrupt-target": (eval_(target=write("a.safetensors", b"garbage")), "not a readable safetensors"),
        "eval-missing-target": (eval_(target=lambda tmp: tmp / "no-such-run"), "no such file or directory"),
        "eval-unknown-retrieval-task": (eval_("--retrieval", "haystack"), "--retrieval takes passkey"),
        "eval-retrieval-depth": (eval_("--retrieval", "passkey", "--retrieval-depths", "1.5"),
                                 "--retrieval-depths lie in [0, 1]"),
        "eval-retrieval-lengths": (eval_("--retrieval", "passkey", "--retrieval-lengths", "long"),
                                   "--retrieval-lengths must be a comma-separated list of int"),
        "eval-retrieval-haystack": (eval_("--retrieval", "passkey", "--retrieval-haystack", "essays"),
                                    "--retrieval-haystack is noise or prose"),
        "eval-bucket-window-0": (eval_("--bucket-window", "0"), "--bucket-window must be at least 1, got 0"),
        "eval-tasks-limit-without-tasks": (eval_("--tasks-limit", "2"), "--tasks-limit and --tasks-fewshot need"),
        "sweep-unknown-rule": (lambda tmp, m, d: ["sweep", "--model", m, "--sparsities", "0.5", "--rules", "nope",
                                                  "--output", tmp / "sweep"], "unknown rule 'nope'"),
        "baseline-sparsity-not-a-number": (lambda tmp, m, d: ["baseline", "--model", m, "--sparsity", "2/x",
                                                              "--output", tmp / "rule"],
                                           "expected a number like 0.75 or a ratio like 5/6, got '2/x'"),
        "sweep-sparsity-above-1": (lambda tmp, m, d: ["sweep", "--model", m, "--sparsities", "0.5,1.5",
                                                      "--output", tmp / "sweep"], "--sparsities must lie between 0 and 1, got 1.5"),
        "show-not-safetensors": (lambda tmp, m, d: ["show", write("notes.txt", "hello")(tmp)],
                                 "is not a readable safetensors allocation file"),
        "show-missing": (lambda tmp, m, d: ["show", tmp / "nothing-here"], "no allocation file at"),
        "baseline-unknown-rule": (lambda tmp, m, d: ["baseline", "--rule", "nope", "--model", m, "--output",
                                                     tmp / "rule"], "unknown rule 'nope'"),
        "unwritable-output": (lambda tmp, m, d: ["search", "--model", m, *SEARCH, "--data", d, "--output",
                                                 write("plain-file", "x")(tmp) / "run"], "is not a writable directory"),
        "export-truncated-allocation": (lambda tmp, m, d: ["export", truncated_run(tmp, m), "--output", tmp / "exp"],
                                        "is not a readable safetensors allocation file"),
        "export-mask-from-another-model": (lambda tmp, m, d: ["export", other_model_run(tmp, m), "--output",
                                                              tmp / "exp"], "allocation is for 3 layers x 2 KV heads"),
    }


BAD_INPUTS = _bad_inputs()
FAILS_AFTER_SEARCH_STARTS = {"per-layer-sparsity-not-exact"}  # needs the model's KV-head count: checked once loaded


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tiny_model_dir, tiny_text_file):
    build, fragment = BAD_INPUTS[case]
    argv = build(tmp_path, tiny_model_dir, tiny_text_file)
    before, model_before = tree(tmp_path), tree(tiny_model_dir)

    result = invoke(*argv)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.output and "unexpected" not in result.stderr
    if case not in FAILS_AFTER_SEARCH_STARTS:
        assert result.stdout.strip() == ""
    assert tree(tmp_path) == before  # no run directory, export, staging directory or JSON left behind
    assert tree(tiny_model_dir) == model_before


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, tiny_text_file):
    result = runner.invoke(app, ["--debug", "search", "--model", str(tmp_path / "no-such-model"), *SEARCH,
                                 "--data", str(tiny_text_file), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr and "ModelError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: no such file or directory")
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_clicks_and_exit_2():
    result = invoke("search", "--steps", "many")
    assert result.exit_code == 2 and "Invalid value" in result.stderr
    assert invoke().exit_code == 2  # no command: the help, as a usage error


def test_console_script_help():
    script = Path(sys.executable).with_name("consa")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("search", "baseline", "export", "eval", "show"):
        assert command in result.stdout
    assert result.stderr == ""


def test_console_script_error_after_loading_the_model_is_one_line(tmp_path, tiny_model_dir):
    """In a real process with stderr piped: no weight-loading progress bar around the one-line error."""
    script = Path(sys.executable).with_name("consa")
    env = {key: value for key, value in os.environ.items() if not key.endswith("DISABLE_PROGRESS_BARS")}
    result = subprocess.run(
        [str(script), "search", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.txt"), *SEARCH,
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr == f"error: no such file or directory: {tmp_path / 'missing.txt'}\n"
    assert not (tmp_path / "run").exists()


def test_help_of_every_command_renders():
    for command in ("search", "baseline", "export", "eval", "show"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.stdout and "Traceback" not in result.output


def test_tiny_model_fixture_matches_conftest(tiny_model_dir):
    """The shared checkpoint is the conftest qwen3 model (same weights), so fingerprints agree across tests."""
    from consa_cli.models import load_model_and_tokenizer, model_fingerprint

    loaded, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.float32)
    assert model_fingerprint(loaded) == model_fingerprint(tiny_model("qwen3"))
    assert len(tokenizer) == 96 and tokenizer.eos_token_id == 1 and tokenizer.pad_token == "<eos>"


def test_native_baseline_is_the_models_own_pattern(tmp_path, tiny_model_dir):
    result = invoke("baseline", "--rule", "native", "--model", tiny_model_dir, "--output", tmp_path / "native")
    assert result.exit_code == 0, result.output
    allocation = Allocation.load(tmp_path / "native")
    assert allocation.method == "native" and allocation.num_full_units == allocation.num_units  # Qwen3: all full


def test_out_of_memory_names_the_knob_to_turn(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    import consa_cli.search

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(consa_cli.search, "run_search", out_of_memory)
    result = invoke("search", "--model", tiny_model_dir, *SEARCH, "--data", tiny_text_file, "--output", tmp_path / "r")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: out of memory; lower --seq-len or --batch-size, or use --dtype bfloat16"


def test_no_code_path_unpickles_files():
    """Untrusted files are read with safetensors only: no torch.load / pickle anywhere in the package."""
    source = Path(__file__).parent.parent / "src" / "consa_cli"
    offenders = [f"{path.name}:{number}" for path in sorted(source.glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if any(call in line for call in ("torch.load(", "pickle.load", "import pickle", "trust_remote_code=True"))]
    assert offenders == []


def test_sweep_command(tmp_path, tiny_model_dir, tiny_text_file):
    result = invoke("sweep", "--model", tiny_model_dir, "--data", tiny_text_file, "--sparsities", "0.5",
                    "--rules", "top", *SEARCH, "--dtype", "float32", "--max-sequences", "2", "--no-report",
                    "--output", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    assert "search 1/1: " in result.stdout and "rule-top-kv-head-s0.5" in result.stdout
    assert f"wrote {tmp_path / 'sweep' / 'eval.json'}" in result.stdout.replace("\n", "")
    assert not (tmp_path / "sweep" / "report").exists()
    rows = json.loads((tmp_path / "sweep" / "eval.json").read_text())["rows"]
    assert [row["method"] for row in rows][0] == "dense" and len(rows) == 3

    result = invoke("sweep", "--model", tiny_model_dir, "--sparsities", "0.5,half", "--output", tmp_path / "bad")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: --sparsities must be a comma-separated list of numbers or ratios (0.5,5/6), got '0.5,half'"
    assert not (tmp_path / "bad").exists()

    result = invoke("sweep", "--model", tiny_model_dir, "--sparsities", "0.5", "--retrieval-fraction", "1.5",
                    "--output", tmp_path / "bad")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --retrieval-fraction must lie in [0, 1), got 1.5"


def test_report_without_matplotlib_fails_before_evaluating(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = invoke("eval", tiny_model_dir, "--data", tiny_text_file, "--report", tmp_path / "report")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: plots need matplotlib: pip install 'consa-cli[plot]'"
    assert not (tmp_path / "report").exists()


def test_search_on_a_natively_hybrid_model_notes_a_target_below_its_native_sparsity(tmp_path, tiny_text_file):
    """Gemma3-style: making natively sliding layers full is out of distribution; the user hears it, once."""
    model_dir = tmp_path / "gemma"
    save_tiny(model_dir, "gemma3_text", num_hidden_layers=6,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    common = ("search", "--model", model_dir, "--data", tiny_text_file, "--seq-len", "32", "--window", "8",
              "--steps", "1", "--granularity", "layer", "--sink-tokens", "0")
    below = invoke(*common, "--sparsity", "0.5", "--output", tmp_path / "below")
    assert below.exit_code == 0, below.output
    assert "natively hybrid (0.667 of its layers trained sliding-window)" in below.stderr
    at_native = invoke(*common, "--sparsity", "2/3", "--output", tmp_path / "native")
    assert at_native.exit_code == 0, at_native.output
    assert "natively hybrid" not in at_native.stderr


def test_retrieval_table_prints_each_models_overall_with_its_standard_error(monkeypatch):
    import io

    from rich.console import Console

    import consa_cli.cli as cli_module

    out = io.StringIO()
    monkeypatch.setattr(cli_module, "console", Console(file=out, width=200))
    cells = [{"task": "passkey", "length": 1024, "depth": 0.5, "accuracy": 0.75, "n": 8}]
    rows = [{"label": "vote4", "retrieval": {"overall": 0.75, "overall_stderr": 0.153, "prompts": 8,
                                             "by_task": {"passkey": 0.75}, "cells": cells}},
            {"label": "old run", "retrieval": {"overall": 0.5, "by_task": {"passkey": 0.5}, "cells": cells}}]
    cli_module._print_retrieval_table(rows)
    text = out.getvalue()
    assert "vote4: overall 0.750 +- 0.153 (8 prompts; +- one binomial standard error)" in text
    assert "old run: overall" not in text  # a result from before the standard error: the table only
    assert "prompt by prompt" not in text  # no dense reference row, no per-prompt outcomes


def test_retrieval_table_compares_each_model_with_dense_prompt_by_prompt(monkeypatch):
    """With per-prompt outcomes on the same prompts, each model's line is followed by what it gained and lost
    against the dense reference and the exact sign test; the reference itself gets no such line."""
    import io

    from rich.console import Console

    import consa_cli.cli as cli_module

    out = io.StringIO()
    monkeypatch.setattr(cli_module, "console", Console(file=out, width=200))

    def result(hits):
        accuracy = sum(hits) / len(hits)
        return {"overall": accuracy, "overall_stderr": 0.1, "prompts": len(hits), "by_task": {"passkey": accuracy},
                "cells": [{"task": "passkey", "length": 1024, "depth": 0.5, "accuracy": accuracy, "n": len(hits),
                           "hits": hits}]}

    rows = [{"label": "dense", "is_reference": True, "retrieval": result([1] * 10)},
            {"label": "mask", "retrieval": result([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])}]
    cli_module._print_retrieval_table(rows)
    text = out.getvalue()
    assert "vs dense, prompt by prompt: 0 gained, 5 lost of 10 (exact sign test p = 0.062)" in text
    assert text.count("prompt by prompt") == 1


def test_search_with_a_retrieval_filter_says_how_many_samples_it_drew_and_fails_cleanly(tmp_path, tiny_model_dir,
                                                                                         tiny_text_file, monkeypatch):
    """--retrieval-filter answered: the start line says how many samples were drawn for the ones kept; a model
    that answers none is a one-line error with nothing written."""
    import re

    import consa_cli.search as search_module

    drawn = []

    def every_third(model):
        def answered(ids, loss_mask):
            drawn.append(ids)
            return len(drawn) % 3 == 0
        return answered

    monkeypatch.setattr(search_module, "answered_by", every_third)
    flags = ["--model", tiny_model_dir, "--data", tiny_text_file, "--seq-len", "128", "--window", "8", "--steps", "2",
             "--sparsity", "0.5", "--retrieval-fraction", "0.5", "--retrieval-filter", "answered"]
    result = invoke("search", *flags, "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output
    kept, of = map(int, re.search(r"\((\d+) retrieval, those the dense model answered of (\d+) drawn\)",
                                  result.stdout.replace("\n", " ")).groups())
    assert kept > 0 and of == 3 * kept == len(drawn)
    monkeypatch.setattr(search_module, "answered_by", lambda model: lambda ids, loss_mask: False)
    result = invoke("search", *flags, "--output", tmp_path / "none")
    assert result.exit_code != 0 and result.stderr.count("\n") == 1
    assert re.search(r"answers only 0 of \d+ retrieval calibration samples", result.stderr)
    assert not (tmp_path / "none").exists()
