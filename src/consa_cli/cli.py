"""The ``consa`` command line. Parses flags, calls the pipeline functions, prints; holds no logic of its own."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from consa_cli.settings import HealSettings, SearchSettings, fraction

app = typer.Typer(
    help="Learn which layers or KV heads of a causal LM keep full attention (ConSA): search -> export -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Wide enough for the comparison table when output goes to a file or CI log (rich defaults to 80 there).
console = Console(stderr=False, width=None if sys.stdout.isatty() else 150)
errors = Console(stderr=True)
DEFAULTS = SearchSettings()
HEAL_DEFAULTS = HealSettings()
STATE = {"debug": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr and exit code 2 (a traceback only with --debug)."""
    from consa_cli.allocation import AllocationError
    from consa_cli.data import DataError
    from consa_cli.downstream import DownstreamError
    from consa_cli.export import ExportError
    from consa_cli.families import UnsupportedModelError
    from consa_cli.models import ModelError
    from consa_cli.plots import PlotError
    from consa_cli.settings import SettingsError

    expected = (AllocationError, DataError, DownstreamError, ExportError, UnsupportedModelError, ModelError, SettingsError, PlotError,
                FileExistsError, FileNotFoundError, PermissionError, FloatingPointError)
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        errors.print("interrupted", style="yellow")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - every failure ends as one line unless --debug
        if STATE["debug"]:
            traceback.print_exc()
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            message = "out of memory; lower --seq-len or --batch-size, or use --dtype bfloat16"
        elif isinstance(error, expected):
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
        else:
            message = f"unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            message += " (rerun with --debug for the traceback)"
        errors.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    STATE["debug"] = debug
    if not sys.stderr.isatty():
        _quiet_library_progress_bars()


def _quiet_library_progress_bars() -> None:
    """Turn off transformers' / datasets' / the hub's tqdm bars when stderr is not a terminal.

    In logs, pipes and CI they are carriage-return noise around consa's own output and one-line errors.
    Modules not imported yet read the environment; those already imported are told directly.
    """
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def _default(name: str, defaults=DEFAULTS) -> str:
    return f"\\[default: {getattr(defaults, name)}]"  # escaped: rich would read [..] as markup


@app.command()
def search(
    model: str = typer.Option(None, "--model", "-m", help="Hub id, alias (Qwen3-0.6B), local checkpoint dir or .gguf "
                              "file. \\[default: the embedded SmolLM2-135M-Instruct]"),
    sparsity: str = typer.Option(None, metavar="FRACTION", help="Fraction of units that become sliding-window: "
                                 f"0.75, or a ratio such as 5/6. {_default('sparsity')}"),
    granularity: str = typer.Option(None, help="Unit: layer, kv-head (one global constraint) or kv-head-per-layer "
                                    f"(same ratio in every layer). {_default('granularity')}"),
    window: int = typer.Option(None, help=f"Sliding window in tokens, the query included. {_default('window')}"),
    sink_tokens: int = typer.Option(None, help="Leading tokens sliding-window units always see "
                                    "\\[default: 4 for Llama/Qwen/Mistral, 0 for Gemma3]"),
    seq_len: int = typer.Option(None, help=f"Tokens per calibration sequence. {_default('seq_len')}"),
    data: str = typer.Option(None, help="Calibration text: 'embedded:enwiki', a .txt/.jsonl/.parquet file or dir, "
                             f"or a hub dataset id. {_default('data')}"),
    steps: int = typer.Option(None, help=f"Optimisation steps. {_default('steps')}"),
    batch_size: int = typer.Option(None, help=f"Sequences per step. {_default('batch_size')}"),
    loss: str = typer.Option(None, help="kl (match the dense model's own outputs) or lm (next-token loss), on the "
                             f"natural-text calibration sequences. {_default('loss')}"),
    retrieval_loss: str = typer.Option(None, help="kl or lm on the synthetic retrieval sequences (their answer "
                                       "tokens; only with --retrieval-fraction > 0). "
                                       f"{_default('retrieval_loss')}"),
    method: str = typer.Option(None, help="l0 (hard-concrete gates + augmented Lagrangian, ConSA), scalar-l1 (sigmoid "
                               "gates + L1 penalty, ranked to the target: the paper's ablation) or attention-mass "
                               "(training-free: rank units by attention mass beyond the window over steps x "
                               f"batch-size calibration sequences). {_default('method')}"),
    l1_weight: float = typer.Option(None, help=f"scalar-l1 only: weight of the mean gate value. {_default('l1_weight')}"),
    retrieval_fraction: float = typer.Option(None, help="Share of calibration sequences that are synthetic long-range "
                                             "retrieval samples (loss on their answer tokens only; formats distinct "
                                             "from `consa eval --retrieval`'s). 0: natural text only. "
                                             f"{_default('retrieval_fraction')}"),
    retrieval_formats: str = typer.Option(None, metavar="FORMATS", help="Comma-separated formats of the synthetic "
                                          "retrieval samples, taken in turn: room-code, home-city, locker-number, "
                                          "flight-gate, pet-name, meeting-day, phone-extension, word-list. "
                                          f"{_default('retrieval_formats')}"),
    calibration_haystack: str = typer.Option(None, metavar="HAYSTACK", help="What the synthetic retrieval samples' "
                                             "needles lie in: text (calibration-split text) or filler (a few plain "
                                             "sentences repeated, none of them the evaluation's). "
                                             f"{_default('calibration_haystack')}"),
    retrieval_filter: str = typer.Option(None, metavar="FILTER", help="Which synthetic retrieval samples to "
                                         "calibrate on: none (all) or answered (only those the dense model "
                                         "answers, drawn until there are enough; one forward each). "
                                         f"{_default('retrieval_filter')}"),
    seed: int = typer.Option(None, help=f"Seed for data order and gate noise. {_default('seed')}"),
    seeds: int = typer.Option(None, metavar="N", help="Search with N seeds (--seed, --seed+1, ...), each in "
                              "OUTPUT/seed-<seed>, and write the vote over them: the units most seeds keep full, "
                              "ties broken by the mean standardised log_alpha. Running the command again keeps "
                              f"finished seeds and resumes an interrupted one. {_default('seeds')}"),
    gate_lr: float = typer.Option(None, help=f"Adam learning rate of the gates' log_alpha. {_default('gate_lr')}"),
    multiplier_lr: float = typer.Option(None, help="Ascent rate of the Lagrange multipliers. "
                                        f"{_default('multiplier_lr')}"),
    target_warmup_steps: int = typer.Option(None, help="Steps over which the target sparsity ramps up from 0. "
                                            f"{_default('target_warmup_steps')}"),
    penalty_init: float = typer.Option(None, help="Starting value of the quadratic multiplier phi; damps the "
                                       "overshoot of E\\[s] around the target (with --resume, a new value restarts phi "
                                       f"from it). {_default('penalty_init')}"),
    dtype: str = typer.Option(None, help=f"Model dtype: bfloat16, float32 or float16. {_default('dtype')}"),
    device: str = typer.Option(None, help=f"cpu, cuda, cuda:N or auto. {_default('device')}"),
    attention_backend: str = typer.Option(None, help="Attention kernels: flex (full and sliding-window branches in "
                                          "one FlexAttention pass; CUDA), flash (flash attention's own window, sinks merged "
                                          "by log-sum-exp; CUDA, bf16/fp16), fa4 (flash-attn-4's window; Hopper+, bf16/fp16, "
                                          "pip install flash-attn-4), sdpa (two calls, the reference), eager, "
                                          f"or auto (flex on CUDA, else sdpa). {_default('attention_backend')}"),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="Run the model's forward (gated "
                                 "student and KL teacher) through torch.compile: norms, rotary and MLP fused besides "
                                 f"the attention kernels; the first steps take longer. {_default('compile')}"),
    skip_closed_gates: bool = typer.Option(None, "--skip-closed-gates/--no-skip-closed-gates", help="Compute the "
                                           "full-attention branch only for the heads whose gate sample is not exactly "
                                           "0 this step (l0): the same losses and gradients, less work as gates close; "
                                           "not with --compile. \\[default: on for CUDA searches of 8192 or more "
                                           "tokens per step (batch size x sequence length) without --compile, else "
                                           "off]"),
    cuda_graphs: bool = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Capture the gated model's "
                                     "forward and backward once as CUDA graphs and replay them every step (CUDA): "
                                     "the same losses and gradients with far less host work per step; not with "
                                     "--compile or --skip-closed-gates. \\[default: on for CUDA searches with the "
                                     "flex or sdpa backend unless --compile or --skip-closed-gates is given]"),
    teacher_cache_gib: float = typer.Option(None, help="Keep the KL teacher's last hidden state of each calibration "
                                            "sequence the search visits again, up to this many GiB on the search's "
                                            "device: a revisit then costs the output head instead of a teacher "
                                            "forward (the same numbers); 0 recomputes every visit. "
                                            f"{_default('teacher_cache_gib')}"),
    output: str = typer.Option(None, "--output", "-o", help=f"Run directory to write. {_default('output')}"),
    checkpoint_every: int = typer.Option(None, help="Steps between checkpoints (checkpoint.safetensors in the run "
                                         "directory, for --resume); 0: only when interrupted and at the end. "
                                         f"{_default('checkpoint_every')}"),
    resume: Path = typer.Option(None, "--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its last "
                                "checkpoint (after Ctrl-C, a kill or a NaN), ending exactly as an uninterrupted run "
                                "would; or extend a finished run with a higher --steps. It keeps its own settings: "
                                "only --steps, --gate-lr, --multiplier-lr, --penalty-init, --checkpoint-every, "
                                "--compile, --skip-closed-gates, --cuda-graphs and --teacher-cache-gib may change."),
    recipe: Path = typer.Option(None, help="YAML file of settings (see recipes/); flags override it."),
    force: bool = typer.Option(False, help="Overwrite an existing run directory."),
):
    """Learn an allocation: hard-concrete gates + augmented Lagrangian on calibration text, weights frozen.

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint; continue with --resume RUN_DIR.
    """
    from consa_cli.checkpoint import SearchInterrupted, load_checkpoint
    from consa_cli.search import search as run
    from consa_cli.settings import SettingsError, build_settings, resumed_settings

    with user_errors():
        flags = dict(
            model=model, sparsity=_sparsity(sparsity), granularity=granularity, window=window, sink_tokens=sink_tokens,
            seq_len=seq_len, data=data, steps=steps, batch_size=batch_size, loss=loss,
            retrieval_loss=retrieval_loss, method=method,
            l1_weight=l1_weight, retrieval_fraction=retrieval_fraction, retrieval_formats=retrieval_formats,
            calibration_haystack=calibration_haystack, retrieval_filter=retrieval_filter, seed=seed, seeds=seeds,
            gate_lr=gate_lr,
            multiplier_lr=multiplier_lr, target_warmup_steps=target_warmup_steps, penalty_init=penalty_init,
            dtype=dtype, device=device, attention_backend=attention_backend, compile=compile,
            skip_closed_gates=skip_closed_gates, cuda_graphs=cuda_graphs, teacher_cache_gib=teacher_cache_gib,
            output=output,
            checkpoint_every=checkpoint_every,
        )
        checkpoint = None
        if resume is None:
            settings = build_settings(SearchSettings, recipe, **flags)
        else:
            if force:
                raise SettingsError("--resume continues a run in place; --force does not apply")
            checkpoint = load_checkpoint(resume)
            settings = resumed_settings(checkpoint.settings, resume, checkpoint.step, recipe, **flags)
        progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
        )
        task = progress.add_task("", total=settings.steps, completed=0 if checkpoint is None else checkpoint.step,
                                 label="search")

        def on_seed(info: dict) -> None:
            if progress.live.is_started:
                progress.stop()  # the previous seed's last line stays on screen and in logs
            which = f"seed {info['index']}/{info['count']}"
            if info["status"] == "finished":
                console.print(f"{which} (--seed {info['seed']}): finished earlier in {info['run_dir']}, kept")
                return
            resumed = f", resuming after step {info['resumed_from']}" if info["status"] == "resume" else ""
            console.print(f"{which} (--seed {info['seed']}) in {info['run_dir']}{resumed}")
            progress.reset(task, total=settings.steps, completed=info["resumed_from"], description="",
                           label=f"search {which}")

        def on_start(info: dict) -> None:
            resumed = f", continuing after step {info['resumed_from']}" if info["resumed_from"] else ""
            retrieval = f" ({info['retrieval_sequences']} retrieval)" if info["retrieval_sequences"] else ""
            if info.get("retrieval_drawn"):  # --retrieval-filter answered
                retrieval = (f" ({info['retrieval_sequences']} retrieval, those the dense model answered of "
                             f"{info['retrieval_drawn']} drawn)")
            retrieval_loss = f" ({settings.retrieval_loss} on retrieval)" if info["retrieval_sequences"] else ""
            console.print(
                f"model [bold]{info['model']}[/] on {info['device']} ({info['attention_backend']} attention"
                f"{', CUDA graphs' if info.get('cuda_graphs') else ''}): "
                f"{info['units']} {settings.granularity} units, "
                f"target sparsity {settings.sparsity}, window {settings.window} + {info['sink_tokens']} sinks, "
                f"{info['calibration_sequences']} x {settings.seq_len}-token calibration sequences"
                f"{retrieval}, method {settings.method}, {settings.loss} loss{retrieval_loss}{resumed}"
            )
            native = info.get("native_sparsity")
            if native is not None and settings.sparsity < native - 1e-3:
                errors.print(
                    f"note: this model is natively hybrid ({native:.3f} of its layers trained sliding-window); a "
                    f"target below that makes natively sliding layers full, which they were not trained for: on "
                    f"Gemma3-270M every such allocation was worse than the native pattern (docs/results.md 1i)",
                    style="yellow", markup=False, highlight=False, soft_wrap=True)
            progress.start()

        def on_step(record: dict) -> None:
            if "task_loss" not in record:  # a training-free method: one record per calibration sequence
                progress.update(task, completed=record["step"], description="scoring calibration sequences")
                return
            progress.update(task, advance=1, description=(
                f"loss {record['task_loss']:.4f}  E[s] {record['expected_sparsity']:.3f}/"
                f"{record['target_sparsity']:.3f}  lambda {record['lambda']:+.3f}  phi {record['phi']:.3f}"
            ))

        try:
            try:
                result = run(settings, force=force, on_start=on_start, on_step=on_step, resume=checkpoint,
                             on_seed=on_seed)
            finally:
                if progress.live.is_started:
                    progress.stop()
        except SearchInterrupted as stop:
            again = ("run the same command again (finished seeds are kept)" if settings.seeds > 1
                     else f"consa search --resume {shlex.quote(str(stop.run_dir))}")
            errors.print(f"interrupted at step {stop.step} of {stop.steps}; checkpoint saved, continue with: {again}",
                         style="yellow", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(128 + stop.signal_number) from None  # the shell's convention: 130 for Ctrl-C
        allocation = result.allocation
        console.print(allocation.describe())
        _print_mask(allocation)
        meta = allocation.metadata
        threshold = (f"log_alpha > 0 threshold keeps {meta['full_units_threshold']} units; ranking keeps exactly "
                     f"{allocation.num_full_units} ({meta['units_where_ranking_differs_from_threshold']} units "
                     "differ). ") if "full_units_threshold" in meta else ""
        if "seeds" in meta:
            unanimous = sum(votes == len(meta["seeds"]) for votes in meta["unit_votes"])
            threshold = (f"vote of {len(meta['seeds'])} seeds ({', '.join(map(str, meta['seeds']))}): "
                         f"{unanimous} of its {allocation.num_full_units} full units kept by every seed. ")
        teacher = meta.get("teacher_forwards")
        teacher = (f"KL teacher: {teacher['computed']} forwards run, {teacher['recalled']} read from the cache. "
                   if teacher else "")
        console.print(f"{threshold}{teacher}{result.seconds:.0f} s. Written to {settings.output}")


def _print_mask(allocation) -> None:
    console.print("layer  KV heads ('#' full attention, '.' sliding window)")
    for layer, row in enumerate(allocation.render_rows()):
        console.print(f"{layer:>5}  {row}", highlight=False)


@app.command()
def baseline(
    rule: str = typer.Option("interleaved", help="interleaved, bottom, top, middle, uniform-heads, random, or "
                             "native (the model's own sliding pattern, e.g. Gemma3's; ignores --sparsity)."),
    model: str = typer.Option(None, "--model", "-m", help="Model the allocation is for \\[default: embedded model]."),
    sparsity: str = typer.Option(str(DEFAULTS.sparsity), metavar="FRACTION",
                                 help="Fraction of units that become sliding-window: 0.75, or a ratio such as 5/6."),
    granularity: str = typer.Option("layer", help="layer, kv-head or kv-head-per-layer."),
    window: int = typer.Option(DEFAULTS.window, help="Sliding window in tokens."),
    sink_tokens: int = typer.Option(None, help="Sink tokens \\[default: the family's default]."),
    seed: int = typer.Option(0, help="Seed of the random rule."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write allocation.safetensors into."),
    force: bool = typer.Option(False, help="Overwrite an existing directory."),
):
    """Write a hand-written rule allocation (same format as a learned one) for export and eval."""
    from consa_cli.allocation import ALLOCATION_FILE
    from consa_cli.baselines import baseline_allocation, check_baseline
    from consa_cli.families import adapter_for
    from consa_cli.models import DEFAULT_MODEL, load_model_and_tokenizer, model_fingerprint
    from consa_cli.search import check_run_dir, prepare_run_dir

    with user_errors():
        sparsity = _sparsity(sparsity)
        check_baseline(rule, sparsity, window)
        check_run_dir(output, force)
        loaded, _ = load_model_and_tokenizer(model)
        sinks = sink_tokens if sink_tokens is not None else adapter_for(loaded.config.model_type).default_sink_tokens
        allocation = baseline_allocation(rule, loaded.config, sparsity, granularity, window, sinks, seed,
                                         model or DEFAULT_MODEL, model_fingerprint(loaded))
        directory = prepare_run_dir(output, force)
        allocation.save(directory / ALLOCATION_FILE)
        console.print(allocation.describe())
        _print_mask(allocation)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory from `consa search`/`consa baseline`, or an allocation "
                                   "file."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    model: str = typer.Option(None, "--model", "-m", help="Override the model named in the allocation."),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
    verify: bool = typer.Option(True, help="Check a native export reproduces consa's runtime logits."),
):
    """Write a loadable checkpoint: safetensors weights, mask file, tokenizer, patched config.json."""
    from consa_cli.export import export_checkpoint

    with user_errors():
        result = export_checkpoint(run_dir, output, model_name=model, force=force, verify=verify)
        how = ("plain transformers: AutoModelForCausalLM.from_pretrained(path)" if result.loader == "transformers"
               else "consa_cli.load_hybrid(path)")
        console.print(f"{result.allocation.describe()}\nwrote {result.path}; load it with {how}")
        if result.max_logit_difference is not None:
            console.print(f"verified: the export reproduces consa's runtime (max logit difference "
                          f"{result.max_logit_difference:.2e})")


@app.command()
def heal(
    run_dir: Path = typer.Argument(..., help="Run directory from `consa search`/`consa baseline`, or an allocation "
                                   "file."),
    output: str = typer.Option(None, "--output", "-o", help="Export directory to write (the format of `consa "
                               f"export`). {_default('output', HEAL_DEFAULTS)}"),
    model: str = typer.Option(None, "--model", "-m", help="Override the model named in the allocation (the same "
                              "checkpoint elsewhere; its fingerprint is checked)."),
    data: str = typer.Option(None, help="Healing text (its calibration split, as `consa search` reads it). "
                             f"{_default('data', HEAL_DEFAULTS)}"),
    seq_len: int = typer.Option(None, help=f"Tokens per healing sequence. {_default('seq_len', HEAL_DEFAULTS)}"),
    steps: int = typer.Option(None, help="Optimisation steps; each reads --batch-size sequences not read before "
                              f"while the split lasts. {_default('steps', HEAL_DEFAULTS)}"),
    batch_size: int = typer.Option(None, help=f"Sequences per step. {_default('batch_size', HEAL_DEFAULTS)}"),
    lr: float = typer.Option(None, help=f"AdamW peak learning rate. {_default('lr', HEAL_DEFAULTS)}"),
    warmup_steps: int = typer.Option(None, help="Linear warm-up steps before the cosine decay. "
                                     f"{_default('warmup_steps', HEAL_DEFAULTS)}"),
    max_grad_norm: float = typer.Option(None, help=f"Gradient clipping norm. {_default('max_grad_norm', HEAL_DEFAULTS)}"),
    train: str = typer.Option(None, help="Weights that train: attention (q/k/v/o of every layer), sliding (those of "
                              "layers with a sliding unit) or all (everything but the input embeddings). "
                              f"{_default('train', HEAL_DEFAULTS)}"),
    retrieval_fraction: float = typer.Option(None, help="Share of synthetic retrieval samples (held-out formats) in "
                                             "the healing data; natural text alone healed as well. "
                                             f"{_default('retrieval_fraction', HEAL_DEFAULTS)}"),
    retrieval_formats: str = typer.Option(None, help="Their formats, comma-separated (as `consa search`). "
                                          f"{_default('retrieval_formats', HEAL_DEFAULTS)}"),
    max_needles: int = typer.Option(None, help="Facts per retrieval sample, at most (1 to 16; one is asked, the "
                                    f"rest are distractors). {_default('max_needles', HEAL_DEFAULTS)}"),
    answer_weight: float = typer.Option(None, help="Extra weight of the KL on a retrieval sample's answer tokens "
                                        "(its loss: mean KL over all tokens + this x the mean over the answer's); "
                                        f"needs --retrieval-fraction > 0. {_default('answer_weight', HEAL_DEFAULTS)}"),
    seed: int = typer.Option(None, help=f"Seed of the data order and retrieval samples. {_default('seed', HEAL_DEFAULTS)}"),
    device: str = typer.Option(None, help="auto (CUDA when available), cpu, cuda or cuda:N. "
                               f"{_default('device', HEAL_DEFAULTS)}"),
    attention_backend: str = typer.Option(None, help="Hybrid attention kernels while training: auto (sdpa: on an "
                                          "H200 faster than flex, which compiles first), sdpa, eager, flex. Training "
                                          "runs in float32. "
                                          f"{_default('attention_backend', HEAL_DEFAULTS)}"),
    cuda_graphs: bool = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Capture the student's forward "
                                     "and backward and the teacher's forward once as CUDA graphs and replay them "
                                     "every step (CUDA): the same steps with far less host work (H200: 232 -> 63 ms "
                                     "a step). \\[default: on for CUDA healings with the sdpa backend]"),
    recipe: Path = typer.Option(None, help="YAML file of heal settings; flags override it."),
    force: bool = typer.Option(False, help="Replace an existing output directory (only once the new one is written)."),
):
    """Train the weights under a fixed allocation to reproduce the dense model (KL distillation), then export.

    The allocation does not change; the result is a hybrid checkpoint that `consa eval` compares with the
    unhealed allocation on the same sequences and prompts.
    """
    from consa_cli.heal import heal as run
    from consa_cli.settings import build_settings

    with user_errors():
        settings = build_settings(
            HealSettings, recipe, model=model, data=data, seq_len=seq_len, steps=steps, batch_size=batch_size, lr=lr,
            warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, train=train,
            retrieval_fraction=retrieval_fraction, retrieval_formats=retrieval_formats, max_needles=max_needles,
            answer_weight=answer_weight, seed=seed, device=device,
            attention_backend=attention_backend, cuda_graphs=cuda_graphs, output=output)
        progress = Progress(
            TextColumn("[bold]heal"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.description}"), console=console,
        )
        task = progress.add_task("", total=settings.steps)
        recent: list[float] = []

        def on_start(info: dict) -> None:
            retrieval = f" ({info['retrieval_sequences']} retrieval)" if info["retrieval_sequences"] else ""
            graphs = ", CUDA graphs" if info.get("cuda_graphs") else ""
            console.print(f"model [bold]{info['model']}[/] on {info['device']} ({info['attention_backend']} "
                          f"attention, float32{graphs}): {info['trained_parameters']:,} parameters train "
                          f"({settings.train}), "
                          f"{info['calibration_sequences']} x {settings.seq_len}-token sequences{retrieval}, "
                          f"{settings.steps} steps of {settings.batch_size}")
            progress.start()

        def on_step(record: dict) -> None:
            recent.append(record["kl"])
            window = recent[-20:]
            progress.update(task, advance=1, description=f"KL {sum(window) / len(window):.4f} (last "
                            f"{len(window)})  lr {record['lr']:.2e}")

        try:
            result = run(run_dir, settings, force=force, on_start=on_start, on_step=on_step)
        finally:
            if progress.live.is_started:
                progress.stop()
        quarter = max(1, len(result.log) // 4)
        first = sum(entry["kl"] for entry in result.log[:quarter]) / quarter
        last = sum(entry["kl"] for entry in result.log[-quarter:]) / quarter
        how = ("plain transformers: AutoModelForCausalLM.from_pretrained(path)" if result.loader == "transformers"
               else "consa_cli.load_hybrid(path)")
        console.print(f"{result.allocation.describe()}\nKL to the dense model on sequences not yet trained on: "
                      f"{first:.4f} (first {quarter} steps) -> {last:.4f} (last {quarter}), {result.seconds:.0f} s.\n"
                      f"wrote {result.path}; load it with {how}; compare: consa eval {shlex.quote(str(run_dir))} "
                      f"{shlex.quote(str(result.path))}")


# Shared by `consa eval` and `consa sweep`.
RETRIEVAL_TASKS = typer.Option(None, "--retrieval", help="Also score long-context retrieval (exact match): "
                               "comma-separated tasks from passkey, multikey, variable-tracking.")
RETRIEVAL_LENGTHS = typer.Option("1024,2048", "--retrieval-lengths",
                                 help="Retrieval prompt lengths in tokens, comma-separated.")
RETRIEVAL_DEPTHS = typer.Option("0.1,0.5,0.9", "--retrieval-depths", help="Needle depths, comma-separated: "
                                "0 = start of the context, 1 = just before the question.")
RETRIEVAL_SAMPLES = typer.Option(4, "--retrieval-samples", help="Prompts per (task, length, depth).")
RETRIEVAL_HAYSTACK = typer.Option(None, "--retrieval-haystack", help="Text around the needles: noise (the pass-key "
                                  "test's repeated sentences) or prose (held-out Wikipedia, harder) \\[default: noise].")
LM_EVAL_TASKS = typer.Option(None, "--tasks", help="Also run lm-evaluation-harness tasks on every target in memory, "
                             "comma-separated (e.g. arc_easy,hellaswag; needs consa-cli\\[lmeval]).")
LM_EVAL_INCLUDE = typer.Option(None, "--tasks-include", metavar="DIR", help="Directory of lm-eval task YAML files "
                               "(e.g. over local JSON data: works offline); their names go in --tasks.")
LM_EVAL_LIMIT = typer.Option(None, "--tasks-limit", help="Documents per task (quick checks only).")
LM_EVAL_FEWSHOT = typer.Option(None, "--tasks-fewshot", help="Few-shot examples \\[default: each task's own].")


@app.command("eval")
def eval_command(
    targets: list[str] = typer.Argument(..., help="Export dirs, run dirs / allocation files (applied to their "
                                        "model in memory) or model names, compared side by side."),
    data: str = typer.Option(None, help="Evaluation text (its held-out split) \\[default: embedded:enwiki]."),
    seq_len: list[int] = typer.Option(None, "--seq-len", help="Sequence length; repeat for several \\[default: 1024]."),
    max_sequences: int = typer.Option(None, help="Held-out sequences per length \\[default: 32]."),
    batch_size: int = typer.Option(None, help="Sequences per forward pass \\[default: 1]."),
    dtype: str = typer.Option(None, help="bfloat16, float32 or float16 \\[default: bfloat16]."),
    device: str = typer.Option(None, help="cpu or cuda \\[default: cpu]."),
    dense: bool = typer.Option(True, help="Include the dense original model as the reference row."),
    dense_model: str = typer.Option(None, help="Dense reference model \\[default: the targets' source model]."),
    model: str = typer.Option(None, "--model", "-m", help="Apply allocation files / run dirs to this model "
                              "instead of the one recorded in them (e.g. a path on another machine); the "
                              "allocation's model fingerprint must still match. Exports keep their own weights."),
    bucket_window: int = typer.Option(None, help="Split perplexity by query position into [0, W), [W, 2W), "
                                      "[2W, 4W), ... \\[default: W = each allocation's sliding window]."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
    report: Path = typer.Option(None, "--report", metavar="DIR", help="Also write DIR/report.md: tables, NLL and "
                                "retrieval vs sparsity per method, and the masks (PNGs; needs matplotlib)."),
    retrieval: str = RETRIEVAL_TASKS,
    retrieval_lengths: str = RETRIEVAL_LENGTHS,
    retrieval_depths: str = RETRIEVAL_DEPTHS,
    retrieval_samples: int = RETRIEVAL_SAMPLES,
    retrieval_haystack: str = RETRIEVAL_HAYSTACK,
    tasks: str = LM_EVAL_TASKS,
    tasks_include: Path = LM_EVAL_INCLUDE,
    tasks_limit: int = LM_EVAL_LIMIT,
    tasks_fewshot: int = LM_EVAL_FEWSHOT,
    efficiency: bool = typer.Option(False, "--efficiency", help="Measure KV-cache bytes, peak memory and prefill / "
                                    "decode speed against the dense model instead of perplexity."),
    context_lengths: str = typer.Option("1024,2048", "--context-lengths",
                                        help="--efficiency prompt lengths in tokens, comma-separated."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="--efficiency batch sizes, comma-separated."),
    decode_steps: int = typer.Option(16, "--decode-steps", help="--efficiency greedy decode steps after prefill."),
    compiled_decode: bool = typer.Option(False, "--compiled-decode", help="--efficiency: every model on a static "
                                         "cache with decode steps compiled into CUDA graphs (torch.compile, "
                                         "reduce-overhead; CUDA)."),
    eager_reference: bool = typer.Option(False, "--eager-reference", help="--compiled-decode: the dense reference "
                                         "decodes eagerly on a dynamic cache, as transformers runs it (its own "
                                         "compiled static-cache decode is slower), in the same run."),
):
    """Held-out perplexity of hybrids next to the dense original (paired per-sequence statistics)."""
    from consa_cli.evaluate import DTYPES, EvalSettings, evaluate, resolve_targets, write_eval_json
    from consa_cli.settings import SettingsError

    if efficiency:
        _efficiency_command(targets, dtype or "bfloat16", device or "cpu", dense_model or model, json_path,
                            context_lengths, batch_sizes, decode_steps, compiled_decode, eager_reference, model)
        return
    with user_errors():
        settings = EvalSettings()
        for name, value in {"data": data, "seq_lens": seq_len or None, "max_sequences": max_sequences,
                            "batch_size": batch_size, "dtype": dtype, "device": device,
                            "dense_model": dense_model or model, "bucket_window": bucket_window}.items():
            if value is not None:
                setattr(settings, name, value)
        settings.include_dense = dense
        _set_retrieval(settings, retrieval, retrieval_lengths, retrieval_depths, retrieval_samples, retrieval_haystack)
        _set_tasks(settings, tasks, tasks_include, tasks_limit, tasks_fewshot)
        if settings.dtype not in DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}")
        if any(n < 2 for n in settings.seq_lens) or settings.max_sequences < 1 or settings.batch_size < 1:
            raise SettingsError("--seq-len must be >= 2, --max-sequences and --batch-size >= 1")
        if settings.bucket_window is not None and settings.bucket_window < 1:
            raise SettingsError(f"--bucket-window must be at least 1, got {settings.bucket_window}")
        if report is not None:
            from consa_cli.plots import require_matplotlib

            require_matplotlib()  # before the evaluation, not after it
        resolved = resolve_targets(targets, model)
        named = list(dict.fromkeys(t.base_model for t in resolved if t.kind != "model" and t.base_model))
        if len(named) > 1 and not settings.dense_model:
            reference = next(t.base_model for t in resolved if t.base_model)
            errors.print(f"note: the targets were made from {len(named)} different models ({', '.join(named)}); "
                         f"every row is compared with {reference}, the first target's; pass --dense-model to "
                         "choose the reference", style="yellow", markup=False, highlight=False, soft_wrap=True)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            tasks: dict[str, int] = {}

            def on_progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = progress.add_task(label, total=total * len(settings.seq_lens))
                progress.advance(tasks[label], done)

            rows = evaluate(resolved, settings, on_progress)
        _print_eval_table(rows)
        _print_bucket_tables(rows)
        if settings.retrieval_tasks:
            _print_retrieval_table(rows)
        if settings.tasks:
            _print_task_table(rows)
        if json_path is not None:
            console.print(f"wrote {write_eval_json(json_path, settings, rows)}")
        if report is not None:
            from consa_cli.report import write_report

            command = "consa " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv[1:] else None
            console.print(f"wrote {write_report(rows, resolved, report, command=command)}")


def _print_task_table(rows: list[dict]) -> None:
    """lm-eval scores: one row per (model, task), one column per metric (stderr in brackets)."""
    from consa_cli.report import task_metric_cells

    table = Table(title="lm-evaluation-harness (in-memory hybrid)")
    for column in ("model", "task", "metrics"):
        table.add_column(column)
    for row in {row["path"]: row for row in rows if "tasks" in row}.values():  # scored once per target
        for task, metrics in row["tasks"].items():
            table.add_row(row["label"], task, "  ".join(task_metric_cells(metrics)))
    console.print(table)


def _set_retrieval(settings, tasks: str | None, lengths: str, depths: str, samples: int,
                   haystack: str | None) -> None:
    """Fill an EvalSettings' retrieval fields from the --retrieval* flags (nothing when ``tasks`` is empty)."""
    from consa_cli.retrieval import HAYSTACKS, TASKS
    from consa_cli.settings import SettingsError

    if not tasks:
        return
    settings.retrieval_tasks = _csv(tasks, str, "--retrieval")
    settings.retrieval_lengths = _csv(lengths, int, "--retrieval-lengths")
    settings.retrieval_depths = _csv(depths, float, "--retrieval-depths")
    settings.retrieval_samples = samples
    settings.retrieval_haystack = haystack or settings.retrieval_haystack
    unknown = [task for task in settings.retrieval_tasks if task not in TASKS]
    if (unknown or samples < 1 or not all(0 <= d <= 1 for d in settings.retrieval_depths)
            or settings.retrieval_haystack not in HAYSTACKS):
        raise SettingsError(f"--retrieval takes {', '.join(TASKS)}; --retrieval-depths lie in [0, 1]; "
                            f"--retrieval-samples >= 1; --retrieval-haystack is {' or '.join(HAYSTACKS)}")


def _set_tasks(settings, tasks: str | None, include: Path | None, limit: int | None, fewshot: int | None) -> None:
    """Fill an EvalSettings' lm-eval fields from the --tasks* flags."""
    from consa_cli.settings import SettingsError

    if not tasks:
        if include or limit is not None or fewshot is not None:
            raise SettingsError("--tasks-include, --tasks-limit and --tasks-fewshot need --tasks")
        return
    if (limit is not None and limit < 1) or (fewshot is not None and fewshot < 0):
        raise SettingsError("--tasks-limit must be >= 1 and --tasks-fewshot >= 0")
    settings.tasks = _csv(tasks, str, "--tasks")
    settings.tasks_include = str(include) if include else None
    settings.tasks_limit, settings.tasks_fewshot = limit, fewshot


def _efficiency_command(targets: list[str], dtype: str, device: str, dense_model: str | None, json_path: Path | None,
                        context_lengths: str, batch_sizes: str, decode_steps: int, compiled_decode: bool,
                        eager_reference: bool = False, model: str | None = None) -> None:
    from consa_cli.efficiency import EfficiencySettings, evaluate_efficiency
    from consa_cli.evaluate import DTYPES, resolve_targets
    from consa_cli.settings import SettingsError

    with user_errors():
        settings = EfficiencySettings(_csv(context_lengths, int, "--context-lengths"),
                                      _csv(batch_sizes, int, "--batch-sizes"), decode_steps,
                                      compiled_decode=compiled_decode, eager_reference=eager_reference)
        if eager_reference and not compiled_decode:
            raise SettingsError("--eager-reference only changes --compiled-decode runs")
        if dtype not in DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}")
        if (not settings.context_lengths or min(settings.context_lengths) < 2 or not settings.batch_sizes
                or min(settings.batch_sizes) < 1 or decode_steps < 1):
            raise SettingsError("--context-lengths must be >= 2, --batch-sizes and --decode-steps >= 1")
        rows = evaluate_efficiency(resolve_targets(targets, model), settings, DTYPES[dtype], device,
                                   dense_model)
        table = Table(title="inference efficiency (KV measured from the cache tensors; ratios vs dense)")
        for column in ("model", "context", "batch", "KV MiB", "vs analytic", "vs dense", "prefill s",
                       "prefill x", "decode tok/s", "decode x", "peak MiB"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in rows:
            peak = f"{row['peak_bytes'] / 2**20:.0f}" if row["peak_bytes"] else "-"
            table.add_row(row["label"], str(row["context_length"]), str(row["batch_size"]),
                          f"{row['kv_bytes'] / 2**20:.1f}", f"{row['kv_vs_analytic']:.3f}", f"{row['kv_vs_dense']:.3f}",
                          f"{row['prefill_s']:.3f}", f"{row['prefill_speedup']:.2f}",
                          f"{row['decode_tokens_per_s']:.1f}", f"{row.get('decode_speedup', math.nan):.2f}", peak)
        console.print(table)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"settings": settings.__dict__, "efficiency": rows}, indent=2) + "\n")
            console.print(f"wrote {json_path}")


def _print_eval_table(rows: list[dict]) -> None:
    table = Table(title="held-out perplexity (delta = mean per-sequence NLL difference vs dense, paired t)")
    for column in ("model", "method", "granularity", "FA units", "sparsity", "window+sinks", "seq len", "PPL",
                   "delta NLL", "t"):
        table.add_column(column, justify="left" if column in ("model", "method", "granularity") else "right")
    for row in rows:
        units = f"{row['full_units']}/{row['units']}" if row["units"] else "all"
        window = f"{row['sliding_window']}+{row['sink_tokens']}" if row["sliding_window"] else "-"
        delta = f"{row['delta_nll_vs_dense']:+.4f}" if "delta_nll_vs_dense" in row else "ref" if row.get(
            "is_reference") else "-"
        t_stat = f"{row['paired_t_vs_dense']:.1f}" if "paired_t_vs_dense" in row else "-"
        method = "original" if row.get("native_pattern") else row["method"]  # a natively hybrid model (Gemma3)
        table.add_row(row["label"], method, row["granularity"] or "-", units, f"{row['sparsity']:.3f}",
                      window, str(row["seq_len"]), f"{row['ppl']:.3f}", delta, t_stat)
    console.print(table)


def _print_bucket_tables(rows: list[dict]) -> None:
    """Perplexity by query position, one table per (sequence length, buckets): where the long-range cost lies."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "position_buckets" in row:
            key = (row["seq_len"], tuple((b["start"], b["end"]) for b in row["position_buckets"]))
            groups.setdefault(key, []).append(row)
    for (seq_len, buckets), group in groups.items():
        table = Table(title=f"perplexity by query position, {seq_len}-token sequences (delta NLL vs dense, paired t); "
                      f"positions below the window see their whole prefix")
        table.add_column("model")
        for start, end in buckets:
            table.add_column(f"[{start}, {end})", justify="right")
        for row in group:
            cells = []
            for bucket in row["position_buckets"]:
                cell = f"{bucket['ppl']:.3f}"
                if "delta_nll_vs_dense" in bucket:
                    cell += f" ({bucket['delta_nll_vs_dense']:+.4f}, t {bucket['paired_t_vs_dense']:.1f})"
                cells.append(cell)
            table.add_row(row["label"], *cells)
        console.print(table)


def _sparsity(text: str | None, option: str = "--sparsity") -> float | None:
    """``--sparsity`` as typed (0.75 or 5/6); None stays None (the recipe's or the default)."""
    from consa_cli.settings import SettingsError

    if text is None:
        return None
    try:
        return fraction(text)
    except ValueError as error:
        raise SettingsError(f"{option}: {error}") from None


def _csv(text: str, kind: type, option: str) -> list:
    """A comma-separated option as a list of ``kind``."""
    from consa_cli.settings import SettingsError

    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        what = "numbers or ratios (0.5,5/6)" if kind is fraction else kind.__name__
        raise SettingsError(f"{option} must be a comma-separated list of {what}, got '{text}'") from None


def _print_retrieval_table(rows: list[dict]) -> None:
    """Retrieval accuracy: one row per (model, task), one column per (length, depth) cell; then each model's overall
    score and, where the dense reference was scored on the same prompts, the prompt-by-prompt comparison."""
    from consa_cli.retrieval import paired_retrieval

    results = {row["label"]: row["retrieval"] for row in rows if "retrieval" in row}
    columns = list(dict.fromkeys((c["length"], c["depth"]) for c in next(iter(results.values()))["cells"]))
    table = Table(title="retrieval exact-match accuracy (columns: prompt tokens @ needle depth)")
    table.add_column("model")
    table.add_column("task")
    for length, depth in columns:
        table.add_column(f"{length}@{depth:g}", justify="right")
    table.add_column("task mean", justify="right")
    for label, result in results.items():
        for task, accuracy in result["by_task"].items():
            by_cell = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"] if c["task"] == task}
            table.add_row(label, task, *(f"{by_cell[cell]:.2f}" for cell in columns), f"{accuracy:.2f}")
    console.print(table)
    reference = next((row["retrieval"] for row in rows if row.get("is_reference") and "retrieval" in row), None)
    for label, result in results.items():
        if "overall_stderr" in result:
            console.print(f"  {label}: overall {result['overall']:.3f} +- {result['overall_stderr']:.3f} "
                          f"({result['prompts']} prompts; +- one binomial standard error)")
        paired = paired_retrieval(result, reference) if reference is not None and result is not reference else None
        if paired is not None:
            console.print(f"    vs dense, prompt by prompt: {paired['gained']} gained, {paired['lost']} lost of "
                          f"{paired['prompts']} (exact sign test p = {paired['p_value']:.2g})")


@app.command()
def sweep(
    sparsities: str = typer.Option(..., help="Target sparsities, comma-separated, e.g. 0.5,0.75,5/6."),
    model: str = typer.Option(None, "--model", "-m", help="Model to convert \\[default: the embedded SmolLM2-135M-Instruct]."),
    granularity: str = typer.Option(DEFAULTS.granularity, help="Unit(s), comma-separated: layer, kv-head, "
                                    "kv-head-per-layer."),
    rules: str = typer.Option("interleaved", help="Baseline rules at every sparsity, comma-separated (see consa "
                              "baseline; 'native' once); '' for none."),
    methods: str = typer.Option(None, help="Search methods, comma-separated (values of search --method); one search "
                                "per method, granularity and sparsity \\[default: the recipe's or search's default]."),
    window: int = typer.Option(None, help=f"Sliding window in tokens. {_default('window')}"),
    sink_tokens: int = typer.Option(None, help="Sink tokens \\[default: the family's default]."),
    seq_len: int = typer.Option(None, help=f"Tokens per calibration sequence. {_default('seq_len')}"),
    data: str = typer.Option(None, help="Calibration text (its calibration split; evaluation uses its held-out split). "
                             f"{_default('data')}"),
    steps: int = typer.Option(None, help=f"Optimisation steps of every search. {_default('steps')}"),
    batch_size: int = typer.Option(None, help=f"Sequences per step (and per evaluation pass). {_default('batch_size')}"),
    loss: str = typer.Option(None, help=f"kl or lm, on natural text. {_default('loss')}"),
    retrieval_loss: str = typer.Option(None, help="kl or lm, on the retrieval samples. "
                                       f"{_default('retrieval_loss')}"),
    retrieval_fraction: float = typer.Option(None, help="Share of synthetic retrieval samples in every search's "
                                             f"calibration data (see search). {_default('retrieval_fraction')}"),
    retrieval_formats: str = typer.Option(None, metavar="FORMATS", help="Formats of those samples (see search). "
                                          f"{_default('retrieval_formats')}"),
    calibration_haystack: str = typer.Option(None, metavar="HAYSTACK", help="Haystack of those samples: text or "
                                             f"filler (see search). {_default('calibration_haystack')}"),
    retrieval_filter: str = typer.Option(None, metavar="FILTER", help="Which of those samples to calibrate on: "
                                         f"none or answered (see search). {_default('retrieval_filter')}"),
    seed: int = typer.Option(None, help=f"Seed of searches and of the random rule. {_default('seed')}"),
    seeds: int = typer.Option(None, metavar="N", help="Seeds per search, the allocation their vote (see search). "
                              f"{_default('seeds')}"),
    dtype: str = typer.Option(None, help=f"bfloat16, float32 or float16. {_default('dtype')}"),
    device: str = typer.Option(None, help=f"cpu, cuda, cuda:N or auto (search and evaluation). {_default('device')}"),
    recipe: Path = typer.Option(None, help="YAML of search settings (see recipes/); flags override it."),
    eval_seq_len: list[int] = typer.Option(None, "--eval-seq-len", help="Evaluation sequence length; repeat for "
                                           "several \\[default: --seq-len]."),
    max_sequences: int = typer.Option(None, help="Held-out evaluation sequences per length \\[default: 32]."),
    retrieval: str = RETRIEVAL_TASKS,
    retrieval_lengths: str = RETRIEVAL_LENGTHS,
    retrieval_depths: str = RETRIEVAL_DEPTHS,
    retrieval_samples: int = RETRIEVAL_SAMPLES,
    retrieval_haystack: str = RETRIEVAL_HAYSTACK,
    tasks: str = LM_EVAL_TASKS,
    tasks_include: Path = LM_EVAL_INCLUDE,
    tasks_limit: int = LM_EVAL_LIMIT,
    tasks_fewshot: int = LM_EVAL_FEWSHOT,
    report: bool = typer.Option(True, help="Write OUTPUT/report/report.md with plots (needs matplotlib)."),
    output: Path = typer.Option(..., "--output", "-o", help="Sweep directory: one run dir per allocation, "
                                "eval.json, report/."),
    force: bool = typer.Option(False, help="Overwrite an existing sweep directory."),
):
    """Search and baseline allocations at several sparsities, evaluate them all, plot the Pareto front."""
    from consa_cli.evaluate import EvalSettings
    from consa_cli.search import resolve_device
    from consa_cli.settings import build_settings
    from consa_cli.sweep import run_sweep

    with user_errors():
        flags = dict(model=model, window=window, sink_tokens=sink_tokens, seq_len=seq_len, data=data, steps=steps,
                     batch_size=batch_size, loss=loss, retrieval_loss=retrieval_loss,
                     retrieval_fraction=retrieval_fraction, retrieval_formats=retrieval_formats,
                     calibration_haystack=calibration_haystack, retrieval_filter=retrieval_filter, seed=seed,
                     seeds=seeds, dtype=dtype, device=device)
        search_settings = build_settings(SearchSettings, recipe, **flags)
        evaluation = EvalSettings(data=search_settings.data, seq_lens=eval_seq_len or [search_settings.seq_len],
                                  batch_size=search_settings.batch_size, dtype=search_settings.dtype,
                                  device=str(resolve_device(search_settings.device)))
        if max_sequences is not None:
            evaluation.max_sequences = max_sequences
        _set_retrieval(evaluation, retrieval, retrieval_lengths, retrieval_depths, retrieval_samples,
                       retrieval_haystack)
        _set_tasks(evaluation, tasks, tasks_include, tasks_limit, tasks_fewshot)
        command = "consa " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv[1:] else None
        result = run_sweep(search_settings, evaluation, _csv(sparsities, fraction, "--sparsities"),
                           _csv(granularity, str, "--granularity"), _csv(rules, str, "--rules"),
                           _csv(methods or "", str, "--methods"), output, force=force, report=report,
                           on_event=lambda message: console.print(message, highlight=False), command=command)
        _print_eval_table(result.rows)
        _print_bucket_tables(result.rows)
        if evaluation.retrieval_tasks:
            _print_retrieval_table(result.rows)
        if evaluation.tasks:
            _print_task_table(result.rows)
        console.print(f"wrote {result.json_path}" + (f" and {result.report_path}" if result.report_path else ""))


@app.command()
def show(
    allocation_path: Path = typer.Argument(..., help="Allocation file, run directory or export directory."),
    png: Path = typer.Option(None, "--png", help="Also draw the mask (and learned log_alpha) into this image "
                             "file (.png, .svg or .pdf; needs matplotlib)."),
):
    """Print an allocation's layers x KV-heads mask; optionally draw it as a heatmap."""
    from consa_cli.allocation import Allocation
    from consa_cli.export import MASK_FILE
    from consa_cli.plots import plot_allocation

    with user_errors():
        path = allocation_path / MASK_FILE if (allocation_path / MASK_FILE).is_file() else allocation_path
        allocation = Allocation.load(path)
        console.print(allocation.describe())
        _print_mask(allocation)
        if png is not None:
            console.print(f"wrote {plot_allocation(allocation, png)}")


def run() -> None:
    """Console-script entry point."""
    app(prog_name="consa")


if __name__ == "__main__":
    sys.exit(run())
