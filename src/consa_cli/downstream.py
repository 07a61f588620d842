"""Downstream benchmarks (ARC, HellaSwag, ... or local task files) through lm-evaluation-harness.

The hybrid is scored in memory: the model consa already holds (an export, or the base model with an allocation
applied) is wrapped in lm-eval's ``HFLM``, so no checkpoint is written and the same tasks score dense and hybrid
alike. lm-eval is optional (``pip install 'consa-cli[lmeval]'``); without it, or when a task's data cannot be
fetched (no network), the command stops with one line saying so before any model is evaluated. Task files
(lm-eval YAML, e.g. over a local JSON file) in ``include_path`` work offline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'consa-cli[lmeval]'"


class DownstreamError(RuntimeError):
    """lm-eval is missing, a task is unknown, or a task's data cannot be loaded."""


@dataclass
class HarnessTasks:
    """Tasks loaded once (:func:`load_tasks`) and scored for every target (:func:`run_tasks`)."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    objects: list  # the top-level lm-eval Task / Group objects, data loaded


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DownstreamError(f"--tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval, TaskManager


def load_tasks(names: list[str], include_path: str | Path | None = None) -> HarnessTasks:
    """lm-eval's task objects for ``names`` (task, group or tag names, or YAML files), with their data loaded.

    Loading once, before any model is evaluated, turns an unknown name or unreachable data into an immediate
    error and lets every target reuse the same documents.
    """
    if not names:
        raise DownstreamError("--tasks needs at least one task name")
    if include_path is not None and not Path(include_path).is_dir():
        raise DownstreamError(f"--tasks-include must be a directory of lm-eval task YAML files: {include_path}")
    _, TaskManager = _harness()
    with _quiet():
        manager = None
        if include_path is not None:  # indexing lm-eval's own ~15k tasks takes ~20 s: skip it when not needed
            manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if manager is None or any(name not in manager.all_tasks for name in names):
            manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        raise DownstreamError(f"unknown lm-eval task '{unknown[0]}'; see `lm-eval ls tasks`, or point "
                              "--tasks-include at a directory of task YAML files")
    try:
        with _quiet():
            loaded = manager.load(names)
    except (ConnectionError, OSError, ValueError) as error:  # datasets' hub and file errors are among these
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DownstreamError(f"cannot load the data of {', '.join(names)} ({first}); without network, use "
                              "local task files with --tasks-include") from None
    children = {child for members in loaded["group_map"].values() for child in members}
    top = [item for name, item in {**loaded["groups"], **loaded["tasks"]}.items() if name not in children]
    return HarnessTasks(names, manager, top)


def run_tasks(model, tokenizer, tasks: HarnessTasks, batch_size: int = 1, limit: int | None = None,
              num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``tasks`` (from :func:`load_tasks`); returns ``{task: {metric: value}}``.

    Metric names are lm-eval's without the filter suffix when it is the default one (``acc``, ``acc_norm``,
    ``acc_stderr``, ...); ``limit`` caps the documents per task (for quick checks, not for reporting).
    """
    lm_eval, _ = _harness()
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        output = lm_eval.simple_evaluate(model=harness_model, tasks=tasks.objects, task_manager=tasks.manager,
                                         limit=limit, num_fewshot=num_fewshot, log_samples=False, verbosity="ERROR")
    return {task: _metrics(values) for task, values in output["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # names, aliases, "N/A" stderr of a single document
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name in ("", "none") else key] = float(value)
    return metrics


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's INFO/WARNING logging (it warns about every in-memory model) within the block."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
