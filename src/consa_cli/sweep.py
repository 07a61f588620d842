"""``consa sweep``: searches and rule baselines over several sparsities, then one evaluation and report.

The Pareto question ("how much perplexity and retrieval does each method give up per unit of sparsity?") needs
the same model searched at several sparsities, the rules at the same sparsities, and everything evaluated on the
same held-out sequences. A sweep is exactly that, written into one directory::

    OUTPUT/<method>-<granularity>-s<sparsity>/    a search run directory per (method, granularity, sparsity)
    OUTPUT/rule-<rule>-<granularity>-s<sparsity>/  a baseline allocation per (rule, granularity, sparsity)
    OUTPUT/eval.json                              every row of the evaluation
    OUTPUT/report/report.md                       tables and plots (:mod:`consa_cli.report`)

Search settings other than sparsity and granularity (window, steps, loss, ...) come from one
:class:`~consa_cli.settings.SearchSettings`; each search method is that settings object with its ``method``
replaced, so a sweep knows nothing about how a method works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from consa_cli.allocation import (
    ALLOCATION_FILE,
    GRANULARITIES,
    Allocation,
    AllocationError,
    full_heads_per_layer,
)
from consa_cli.baselines import BASELINES, baseline_allocation
from consa_cli.evaluate import EvalSettings, Target, evaluate, resolve_target, write_eval_json
from consa_cli.settings import SearchSettings, SettingsError

EVAL_FILE = "eval.json"
REPORT_DIR = "report"


@dataclass
class SweepRun:
    """One allocation of the sweep: a search (``settings``) or a baseline rule, and where it is written."""

    name: str
    sparsity: float
    granularity: str
    settings: SearchSettings | None = None  # None: a baseline rule
    rule: str | None = None


@dataclass
class SweepResult:
    runs: list[SweepRun]
    rows: list[dict]
    targets: list[Target]
    json_path: Path
    report_path: Path | None = None
    search_seconds: dict[str, float] = field(default_factory=dict)


def plan_sweep(search: SearchSettings, sparsities: list[float], granularities: list[str], rules: list[str],
               methods: list[str], output: str | Path) -> list[SweepRun]:
    """Every search and baseline of the sweep, each validated; nothing is loaded or written.

    ``methods`` are values of ``SearchSettings.method`` (empty: ``search``'s own method, one search per cell).
    The ``native`` rule (the model's own pattern) ignores sparsity and granularity and is planned once.
    """
    if not sparsities:
        raise SettingsError("--sparsities needs at least one value")
    outside = [sparsity for sparsity in sparsities if not 0.0 <= sparsity <= 1.0]
    if outside:
        raise SettingsError(f"--sparsities must lie between 0 and 1, got {outside[0]}")
    if not granularities:
        raise SettingsError("--granularity needs at least one value")
    bad = [g for g in granularities if g not in GRANULARITIES]
    if bad:
        raise SettingsError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{bad[0]}'")
    unknown = [rule for rule in rules if rule not in BASELINES]
    if unknown:
        raise SettingsError(f"unknown rule '{unknown[0]}'; choose from {', '.join(BASELINES)}")
    if "uniform-heads" in rules and "layer" in granularities:
        raise SettingsError("rule 'uniform-heads' needs a KV-head granularity; drop 'layer' or the rule")
    output = Path(output)
    runs = []
    for method in methods or [None]:
        for granularity in granularities:
            for sparsity in sparsities:
                settings = _with(search, sparsity=sparsity, granularity=granularity, method=method)
                name = f"{method or getattr(search, 'method', 'learned')}-{granularity}-s{sparsity:g}"
                settings = dataclasses.replace(settings, output=str(output / name))
                settings.validate()
                runs.append(SweepRun(name, sparsity, granularity, settings=settings))
    for rule in rules:
        cells = [(None, None)] if rule == "native" else [(g, s) for g in granularities for s in sparsities]
        for granularity, sparsity in cells:  # the searches' settings have checked every sparsity
            name = "native" if rule == "native" else f"rule-{rule}-{granularity}-s{sparsity:g}"
            runs.append(SweepRun(name, sparsity or 0.0, granularity or "layer", rule=rule))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise SettingsError("the sweep lists the same sparsity, granularity, method or rule twice")
    return runs


def _with(settings: SearchSettings, method: str | None = None, **changes) -> SearchSettings:
    """``settings`` with ``changes`` (and ``method``, when given) replaced."""
    if method is not None:
        if "method" not in {f.name for f in dataclasses.fields(settings)}:
            raise SettingsError("this consa has no search methods to sweep over; leave out --methods")
        changes["method"] = method
    return dataclasses.replace(settings, **changes)


def run_sweep(search: SearchSettings, eval_settings: EvalSettings, sparsities: list[float], granularities: list[str],
              rules: list[str], methods: list[str], output: str | Path, force: bool = False, report: bool = True,
              on_event: Callable[[str], None] | None = None, command: str | None = None) -> SweepResult:
    """Plan, write the baselines, run every search, then evaluate everything against dense and report.

    ``command`` (the command line) is quoted at the top of the report.

    Rule allocations are built before the first search, so a rule or sparsity that does not fit the model
    (e.g. a per-layer head ratio its KV-head count cannot give) fails in seconds rather than after hours.
    """
    from consa_cli.families import adapter_for
    from consa_cli.models import DEFAULT_MODEL, load_model_and_tokenizer, model_fingerprint
    from consa_cli.search import check_run_dir, prepare_run_dir
    from consa_cli.search import search as run_search

    say = on_event or (lambda message: None)
    runs = plan_sweep(search, sparsities, granularities, rules, methods, output)
    if report:
        from consa_cli.plots import require_matplotlib

        require_matplotlib()
    check_run_dir(output, force)
    model, _ = load_model_and_tokenizer(search.model, device="cpu")  # for its shape and fingerprint only
    config, fingerprint = model.config, model_fingerprint(model)
    del model
    sinks = search.sink_tokens if search.sink_tokens is not None else adapter_for(config.model_type).default_sink_tokens
    for run in runs:
        if run.settings is not None and run.granularity == "kv-head-per-layer":
            full_heads_per_layer(config.num_key_value_heads, run.sparsity)
    baselines = {run.name: baseline_allocation(run.rule, config, run.sparsity, run.granularity, search.window, sinks,
                                               search.seed, search.model or DEFAULT_MODEL, fingerprint)
                 for run in runs if run.rule is not None}
    directory = prepare_run_dir(output, force)
    for name, allocation in baselines.items():
        (directory / name).mkdir(exist_ok=True)
        allocation.save(directory / name / ALLOCATION_FILE)
    seconds = {}
    searches = [run for run in runs if run.settings is not None]
    for index, run in enumerate(searches, start=1):
        say(f"search {index}/{len(searches)}: {run.name}")
        result = run_search(run.settings, force=force)
        seconds[run.name] = round(result.seconds, 2)
        say(f"  {result.allocation.describe()} ({result.seconds:.0f} s)")
    targets = [resolve_target(str(directory / run.name)) for run in runs]
    _check_same_model(targets)
    say(f"evaluating {len(targets)} allocations and the dense model")
    rows = evaluate(targets, eval_settings)
    json_path = write_eval_json(directory / EVAL_FILE, eval_settings, rows)
    report_path = None
    if report:
        from consa_cli.report import write_report

        report_path = write_report(rows, targets, directory / REPORT_DIR,
                                   title=f"consa sweep: {search.model or DEFAULT_MODEL}", command=command)
    return SweepResult(runs, rows, targets, json_path, report_path, seconds)


def _check_same_model(targets: list[Target]) -> None:
    """Every allocation of a sweep is for one model, so all of them pair with one dense reference."""
    models = {target.allocation.model for target in targets if isinstance(target.allocation, Allocation)}
    if len(models) > 1:
        raise AllocationError(f"the sweep's allocations name different models: {', '.join(sorted(models))}")
