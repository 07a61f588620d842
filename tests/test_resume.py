"""Interrupted searches: checkpoints, --resume, signals, NaN recovery; a resumed run ends bit for bit as an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from typer.testing import CliRunner

import consa_cli.checkpoint
import consa_cli.search
from consa_cli.allocation import Allocation
from consa_cli.checkpoint import CHECKPOINT_FILE, CheckpointError, SearchInterrupted, load_checkpoint
from consa_cli.cli import app
from consa_cli.search import METRICS_FILE, run_search
from consa_cli.settings import SearchSettings

SEQUENCES = torch.randint(0, 96, (12, 32), generator=torch.Generator().manual_seed(5))
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread, monkeypatch):
    """Out of the real consa cache, on one torch thread; progress-bar settings restored afterwards."""
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))


def settings(**overrides) -> SearchSettings:
    values = dict(window=8, seq_len=32, steps=6, sparsity=0.5, target_warmup_steps=2, dtype="float32",
                  granularity="kv-head-per-layer", checkpoint_every=2)  # per layer: one multiplier per layer
    return SearchSettings(**{**values, **overrides})


def search_into(run_dir: Path, resume=None, model=None, sequences=SEQUENCES, on_step=None, **overrides):
    """run_search on the conftest qwen3 model, with metrics and checkpoints in ``run_dir``."""
    run_dir.mkdir(exist_ok=True)
    return run_search(settings(**overrides), model or tiny_model("qwen3"), sequences, 2, "tiny-qwen3",
                      on_step=on_step, metrics_path=run_dir / METRICS_FILE, checkpoint_dir=run_dir, resume=resume)


def without_seconds(metrics: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in metrics]


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# --- library level -----------------------------------------------------------------------------------------


def test_resumed_search_matches_an_uninterrupted_one(tmp_path):
    straight = search_into(tmp_path / "straight", steps=6)
    search_into(tmp_path / "resumed", steps=3)  # a finished 3-step run, extended below
    assert load_checkpoint(tmp_path / "resumed").step == 3  # the final step is always checkpointed

    resumed = search_into(tmp_path / "resumed", resume=load_checkpoint(tmp_path / "resumed"), steps=6)

    assert torch.equal(resumed.allocation.scores, straight.allocation.scores)
    assert without_seconds(resumed.metrics) == without_seconds(straight.metrics)
    assert without_seconds(logged(tmp_path / "resumed")) == without_seconds(straight.metrics)
    assert resumed.first_step == 3 and resumed.allocation.metadata["resumes"] == [
        {"step": 3, "changed": {"steps": [3, 6]}}]
    # The whole state agrees, optimiser moments and noise generator included.
    final, expected = checkpoint_tensors(tmp_path / "resumed"), checkpoint_tensors(tmp_path / "straight")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in final)


def test_checkpoint_is_plain_safetensors(tmp_path):
    search_into(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    data_end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert len(raw) == 8 + header_size + data_end  # a JSON header and raw tensor bytes: nothing to unpickle

    tensors = checkpoint_tensors(tmp_path)
    assert set(tensors) == {"log_alpha", "lagrange_linear", "lagrange_quadratic", "generator_state",
                            "gate_optimizer.0.exp_avg", "gate_optimizer.0.exp_avg_sq", "gate_optimizer.0.step"}
    assert tensors["generator_state"].dtype == torch.uint8 and tensors["log_alpha"].shape == (8,)
    assert tensors["lagrange_linear"].shape == (4,)  # one constraint per layer
    meta = json.loads(header["__metadata__"]["consa_checkpoint"])
    assert (meta["step"], meta["model_fingerprint"], meta["settings"]["steps"]) == (2, "tiny-qwen3", 2)
    assert len(meta["data_fingerprint"]) == 16 and meta["resumes"] == []


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_the_search_after_the_step_with_a_checkpoint(tmp_path, signal_number, ctrl_c_delivered):
    before = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]

    def signal_at_step_2(record: dict) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), signal_number)

    with pytest.raises(SearchInterrupted) as stopped:
        search_into(tmp_path / "run", on_step=signal_at_step_2, steps=5, checkpoint_every=0)
    assert (stopped.value.step, stopped.value.steps, stopped.value.run_dir) == (2, 5, tmp_path / "run")
    assert stopped.value.signal_number == signal_number
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == before
    assert load_checkpoint(tmp_path / "run").step == 2 and len(logged(tmp_path / "run")) == 2

    resumed = search_into(tmp_path / "run", resume=load_checkpoint(tmp_path / "run"), steps=5)
    straight = search_into(tmp_path / "straight", steps=5)
    assert torch.equal(resumed.allocation.scores, straight.allocation.scores)


def test_second_signal_during_the_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                  ctrl_c_delivered):
    """The first Ctrl-C asks for a checkpoint; a second one stops at once, even mid-write, harmlessly."""
    real_save_file = consa_cli.checkpoint.save_file

    def second_ctrl_c_mid_write(tensors, filename, metadata):
        real_save_file(tensors, filename, metadata=metadata)
        if json.loads(metadata["consa_checkpoint"])["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the temp file is written, not yet renamed into place

    def first_ctrl_c(record: dict) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(consa_cli.checkpoint, "save_file", second_ctrl_c_mid_write)
    with pytest.raises(KeyboardInterrupt):
        search_into(tmp_path, on_step=first_ctrl_c, steps=5, checkpoint_every=1)
    assert load_checkpoint(tmp_path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]  # no temp file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_names_the_last_good_checkpoint_and_resume_may_change_rates(tmp_path, monkeypatch):
    real_kl = consa_cli.search.search_loss
    calls = []

    def nan_at_step_4(*args, **kwargs):
        calls.append(None)
        return real_kl(*args, **kwargs) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setattr(consa_cli.search, "search_loss", nan_at_step_4)
    with pytest.raises(FloatingPointError) as error:
        search_into(tmp_path, steps=6)
    assert str(error.value) == (f"loss became nan at step 4; the last good checkpoint is step 2; continue from it "
                                f"with a lower rate: consa search --resume {tmp_path} --gate-lr 0.15 (or a lower "
                                "--multiplier-lr)")
    assert load_checkpoint(tmp_path).step == 2 and len(logged(tmp_path)) == 3

    monkeypatch.setattr(consa_cli.search, "search_loss", real_kl)
    resumed = search_into(tmp_path, resume=load_checkpoint(tmp_path), steps=6, gate_lr=0.15, penalty_init=5.0)
    assert [record["step"] for record in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    assert without_seconds(logged(tmp_path)) == without_seconds(resumed.metrics)
    assert resumed.metrics[1]["phi"] > 19.9 and abs(resumed.metrics[2]["phi"] - 5.0) < 0.1  # phi restarted at 5
    assert resumed.allocation.metadata["resumes"] == [
        {"step": 2, "changed": {"gate_lr": [0.3, 0.15], "penalty_init": [20.0, 5.0]}}]


def test_resume_refuses_another_model_or_changed_data(tmp_path):
    search_into(tmp_path, steps=1)
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="made for another model"):
        run_search(settings(), tiny_model("qwen3", seed=1), SEQUENCES, 2, "other-model", resume=checkpoint)
    with pytest.raises(CheckpointError, match="calibration data differ"):
        search_into(tmp_path, resume=checkpoint, sequences=SEQUENCES.flip(0))


# --- command line, in real processes -------------------------------------------------------------------------

# Runs consa like `python -m consa_cli.cli`, but pauses once, at the n-th call of a function of consa_cli.search
# (or of consa_cli.checkpoint when the name is written `checkpoint.NAME`),
# after touching a marker file: the test signals the process at a known point of the run, without guessing times.
PAUSING_CONSA = """
import os, signal, sys, time
from pathlib import Path
import consa_cli.checkpoint as checkpoint
import consa_cli.search as search
from consa_cli.cli import run

name, nth, when, seconds = os.environ["CONSA_TEST_PAUSE"].split(":")
module, _, name = name.rpartition(".")
module = checkpoint if module == "checkpoint" else search
original, calls = getattr(module, name), []

def pause():
    Path(os.environ["CONSA_TEST_PAUSED"]).touch()
    time.sleep(float(seconds))

def pausing(*args, **kwargs):
    calls.append(None)
    if len(calls) == int(nth) and when == "before":
        pause()
    result = original(*args, **kwargs)
    if len(calls) == int(nth) and when == "after":
        pause()
    return result

setattr(module, name, pausing)
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even where the test runner ignores it
sys.exit(run())
"""


def search_args(model_dir: Path, data_file: Path) -> list[str]:
    return ["search", "--model", str(model_dir), "--data", str(data_file), "--seq-len", "32", "--window", "8",
            "--steps", "8", "--sparsity", "0.5"]


def invoke(*args: str | Path):
    return runner.invoke(app, [str(arg) for arg in args])


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, tiny_text_file, session_cache_dir):
    """An uninterrupted 8-step run through the CLI: what every interrupted and resumed run must end as."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONSA_CACHE", str(session_cache_dir))
        for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            patch.setenv(variable, os.environ.get(variable, "1"))
        torch.set_num_threads(1)
        try:
            result = invoke(*search_args(tiny_model_dir, tiny_text_file), "--output", run_dir)
        finally:
            torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return run_dir


def start_paused(tmp_path: Path, argv: list[str], pause: str) -> tuple[subprocess.Popen, Path]:
    """Start consa in a real process that pauses as ``pause`` (function:nth:before|after:seconds) says."""
    marker = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONSA_TEST_PAUSE": pause, "CONSA_TEST_PAUSED": str(marker)}
    process = subprocess.Popen([sys.executable, "-c", PAUSING_CONSA, *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"consa exited with {process.returncode} before pausing: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("consa did not reach its pause")
        time.sleep(0.05)
    return process, marker


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    assert torch.equal(Allocation.load(run_dir).scores, Allocation.load(reference).scores)
    assert without_seconds(logged(run_dir)) == without_seconds(logged(reference))
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind


# name: (pause: function:nth:when, checkpointed step and logged steps when killed, temp file left)
KILL_POINTS = {
    "mid-step": ("search_loss:5:before", 4, 4, False),
    "after-logging-before-checkpoint": ("save_checkpoint:2:before", 1, 2, False),
    "mid-checkpoint-write": ("checkpoint.save_file:6:after", 5, 6, True),
}


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_sigkill_then_resume_ends_as_the_uninterrupted_run(kill_point, tmp_path, tiny_model_dir, tiny_text_file,
                                                           reference_run):
    pause, checkpointed, logged_steps, temp_file_left = KILL_POINTS[kill_point]
    run_dir = tmp_path / "run"
    process, _ = start_paused(tmp_path, [*search_args(tiny_model_dir, tiny_text_file), "--output", str(run_dir),
                                         "--checkpoint-every", "1"], f"{pause}:600")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    assert load_checkpoint(run_dir).step == checkpointed and len(logged(run_dir)) == logged_steps
    assert any(p.name.startswith(f".{CHECKPOINT_FILE}.") for p in run_dir.iterdir()) == temp_file_left
    result = invoke("search", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert f"continuing after step {checkpointed}" in result.stdout
    assert_same_as_reference(run_dir, reference_run)


def test_ctrl_c_exits_130_with_a_checkpoint_and_resume_ends_as_the_uninterrupted_run(
        tmp_path, tiny_model_dir, tiny_text_file, reference_run):
    run_dir = tmp_path / "run"
    process, _ = start_paused(tmp_path, [*search_args(tiny_model_dir, tiny_text_file), "--output", str(run_dir)],
                              "search_loss:3:before:2")  # Ctrl-C during step 3, which still completes
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130
    assert stderr == (f"interrupted at step 3 of 8; checkpoint saved, continue with: consa search --resume "
                      f"{run_dir}\n")
    assert load_checkpoint(run_dir).step == 3 and len(logged(run_dir)) == 3
    assert not (run_dir / "allocation.safetensors").exists()
    result = invoke("search", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run_dir, reference_run)


# --- command line, refusals ----------------------------------------------------------------------------------

RESUME_ERRORS = {
    "conflicting-flag": (["--window", "16"], "--resume continues a run with its own settings; --window differs "
                                             "(run: 8, given: 16)"),
    "conflicting-recipe": (["--recipe", "recipe.yaml"], "--sparsity differs (run: 0.5, given: 0.25)"),
    "other-output": (["--output", "elsewhere"], "--output differs"),
    "steps-below-done": (["--steps", "4"], "--steps 4 is fewer than the 8 steps the run has done"),
    "force": (["--force"], "--force does not apply"),
    "no-checkpoint": ([], "has no checkpoint.safetensors; --resume continues a run of `consa search`"),
    "no-directory": ([], "no run directory at"),
    "corrupt-checkpoint": ([], "is not a readable consa checkpoint"),
}


@pytest.mark.parametrize("case", list(RESUME_ERRORS))
def test_resume_refusal_is_one_line_exit_2_and_writes_nothing(case, tmp_path, reference_run, monkeypatch):
    extra, fragment = RESUME_ERRORS[case]
    (tmp_path / "recipe.yaml").write_text("sparsity: 0.25\ngate_lr: 0.1\n")  # the new rate alone would be fine
    run_dir = {"no-checkpoint": tmp_path / "empty", "no-directory": tmp_path / "missing",
               "corrupt-checkpoint": tmp_path / "corrupt"}.get(case, reference_run)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / CHECKPOINT_FILE).write_bytes(b"not safetensors")
    before, reference_before = tree(tmp_path), tree(reference_run)
    monkeypatch.chdir(tmp_path)  # for the relative --recipe and --output

    result = invoke("search", "--resume", run_dir, *extra)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert tree(tmp_path) == before and tree(reference_run) == reference_before
