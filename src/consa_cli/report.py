"""``consa eval --report DIR``: many allocations compared in one Markdown report, with plots.

The report is built from :func:`consa_cli.evaluate.evaluate`'s rows and the targets' allocations only, so it
never asks how an allocation was made: a method is its ``allocation.method`` and granularity (``learned
kv-head``, ``rule:interleaved layer``, ...). It holds

- a perplexity table (PPL, NLL difference to dense with its paired t, the same over positions beyond the window),
- perplexity by query-position bucket, and retrieval accuracy when it was measured,
- plots of the NLL difference and retrieval accuracy against sparsity, one line per method (the Pareto front),
- the masks of the allocations at each sparsity, learned ones next to the rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from consa_cli.allocation import Allocation, write_atomically
from consa_cli.evaluate import Target
from consa_cli.plots import plot_masks, plot_versus_sparsity

REPORT_FILE = "report.md"
MAX_MASK_PANELS = 8  # per picture: beyond that the masks get too thin to read


def method_label(method: str, granularity: str | None) -> str:
    """How a method is named in tables and legends: ``dense``, ``learned kv-head``, ``rule:top layer``."""
    return method if granularity is None else f"{method} {granularity}"


def write_report(rows: list[dict], targets: Iterable[Target], directory: str | Path,
                 title: str = "consa evaluation report", command: str | None = None) -> Path:
    """Write ``directory/report.md`` and its PNGs for ``rows`` of :func:`~consa_cli.evaluate.evaluate`.

    ``targets`` supply the allocations whose masks are drawn; ``command`` (the command line that produced
    the rows) is quoted at the top so the report says how to reproduce it. Returns the report's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += _perplexity_section(rows)
    lines += _bucket_section(rows)
    lines += _retrieval_section(rows)
    lines += _task_section(rows)
    lines += _sparsity_plots(rows, directory)
    lines += _mask_section([t for t in targets if t.allocation is not None], directory)
    path = directory / REPORT_FILE
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines).rstrip() + "\n"))
    return path


def _perplexity_section(rows: list[dict]) -> list[str]:
    lines = ["## Perplexity", "",
             "Held-out perplexity; delta = mean per-sequence NLL difference to the dense model (nats/token, "
             "paired t in brackets); *beyond window*: the same over predictions whose query lies at or after the "
             "sliding window, where a sliding-window unit loses context.", "",
             _header("target", "method", "FA units", "sparsity", "window+sinks", "seq len", "PPL", "delta NLL",
                     "delta NLL beyond window")]
    for row in rows:
        units = f"{row['full_units']}/{row['units']}" if row["units"] else "all"
        window = f"{row['sliding_window']}+{row['sink_tokens']}" if row["sliding_window"] else "-"
        beyond = row.get("beyond_window", {})
        lines.append(_cells(row["label"], method_label(row["method"], row["granularity"]), units,
                            f"{row['sparsity']:.3f}", window, row["seq_len"], f"{row['ppl']:.3f}",
                            _delta(row, reference=row.get("is_reference", False)),
                            _delta(beyond, reference=row.get("is_reference", False))))
    return [*lines, ""]


def _bucket_section(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "position_buckets" in row:
            groups.setdefault((row["seq_len"], tuple((b["start"], b["end"]) for b in row["position_buckets"])),
                              []).append(row)
    if not groups:
        return []
    lines = ["## Perplexity by query position", "",
             "PPL per bucket of query positions (delta NLL vs dense, paired t). Queries below the window see their "
             "whole prefix, so the first bucket matches dense; the long-range cost is in the later ones.", ""]
    for (seq_len, buckets), group in groups.items():
        lines += [f"{seq_len}-token sequences:", "",
                  _header("target", *(f"[{start}, {end})" for start, end in buckets))]
        for row in group:
            cells = [f"{b['ppl']:.3f}" + (f"; {_delta(b)}" if "delta_nll_vs_dense" in b else "")
                     for b in row["position_buckets"]]
            lines.append(_cells(row["label"], *cells))
        lines.append("")
    return lines


def _with_stderr(retrieval: dict) -> str:
    """``0.64 +- 0.05`` (results written before the standard error was recorded: just the accuracy)."""
    if "overall_stderr" not in retrieval:
        return f"{retrieval['overall']:.2f}"
    return f"{retrieval['overall']:.2f} +- {retrieval['overall_stderr']:.2f}"


def _retrieval_section(rows: list[dict]) -> list[str]:
    results = _one_per_target(rows, lambda row: "retrieval" in row)
    if not results:
        return []
    tasks = list(results[0]["retrieval"]["by_task"])
    cells = list(dict.fromkeys((c["task"], c["length"], c["depth"]) for c in results[0]["retrieval"]["cells"]))
    lines = ["## Retrieval", "", "Exact-match accuracy, overall (+- one binomial standard error over its prompts) and "
             "per task.", "",
             _header("target", "method", "sparsity", "overall", *tasks)]
    for row in results:
        retrieval = row["retrieval"]
        lines.append(_cells(row["label"], method_label(row["method"], row["granularity"]), f"{row['sparsity']:.3f}",
                            _with_stderr(retrieval), *(f"{retrieval['by_task'][t]:.2f}" for t in tasks)))
    lines += ["", "Per cell (task, prompt tokens @ needle depth):", "",
              _header("target", *(f"{task} {length}@{depth:g}" for task, length, depth in cells))]
    for row in results:
        by_cell = {(c["task"], c["length"], c["depth"]): c["accuracy"] for c in row["retrieval"]["cells"]}
        lines.append(_cells(row["label"], *(f"{by_cell[cell]:.2f}" for cell in cells)))
    return [*lines, ""]


def task_metric_cells(metrics: dict[str, float]) -> list[str]:
    """``acc 0.512 (0.011)`` for every lm-eval metric of a task, its stderr in brackets."""
    return [f"{name} {value:.3f}" + (f" ({metrics[name + '_stderr']:.3f})" if name + "_stderr" in metrics else "")
            for name, value in metrics.items() if not name.endswith("_stderr") and name != "sample_len"]


def _task_section(rows: list[dict]) -> list[str]:
    results = _one_per_target(rows, lambda row: "tasks" in row)
    if not results:
        return []
    lines = ["## Downstream tasks (lm-evaluation-harness)", "", "Standard error in brackets.", "",
             _header("target", "method", "sparsity", "task", "metrics")]
    for row in results:
        for task, metrics in row["tasks"].items():
            lines.append(_cells(row["label"], method_label(row["method"], row["granularity"]),
                                f"{row['sparsity']:.3f}", task, ", ".join(task_metric_cells(metrics))))
    return [*lines, ""]


def _sparsity_plots(rows: list[dict], directory: Path) -> list[str]:
    """The Pareto pictures: NLL difference (whole sequence and beyond the window) and retrieval vs sparsity."""
    lines = []
    for seq_len in dict.fromkeys(row["seq_len"] for row in rows):
        at_length = [row for row in rows if row["seq_len"] == seq_len]
        for name, key, what in (("delta-nll", None, "all positions"),
                                ("delta-nll-beyond-window", "beyond_window", "queries beyond the window")):
            series = _series(at_length, lambda row, key=key: (row.get(key) or {} if key else row).get(
                "delta_nll_vs_dense"))
            if series:
                picture = plot_versus_sparsity(series, directory / f"{name}-{seq_len}.png",
                                               "NLL difference to dense (nats/token)",
                                               f"{seq_len}-token sequences, {what}", reference=0.0)
                lines.append(f"![{name} at {seq_len} tokens]({picture.name})")
    with_retrieval = _one_per_target(rows, lambda row: "retrieval" in row)
    series = _series(with_retrieval, lambda row: row["retrieval"]["overall"])
    if series:
        dense = next((row["retrieval"]["overall"] for row in with_retrieval if row.get("is_reference")), None)
        picture = plot_versus_sparsity(series, directory / "retrieval.png", "retrieval exact-match accuracy",
                                       "retrieval accuracy (all tasks and cells)", reference=dense)
        lines.append(f"![retrieval accuracy vs sparsity]({picture.name})")
    return ["## Versus sparsity", "", "One line per method; dashed: the dense model.", "", *lines, ""] if lines else []


def _mask_section(targets: list[Target], directory: Path) -> list[str]:
    """One picture per sparsity: the allocations there, learned (anything but a rule) before the rules."""
    by_sparsity: dict[float, list[Target]] = {}
    for target in targets:
        by_sparsity.setdefault(round(target.allocation.sparsity, 3), []).append(target)
    lines = []
    for sparsity, group in sorted(by_sparsity.items()):
        group.sort(key=lambda t: t.allocation.method.startswith("rule:"))  # stable: learned first
        panels = [(_mask_title(t.label, t.allocation), t.allocation) for t in group[:MAX_MASK_PANELS]]
        picture = plot_masks(panels, directory / f"masks-sparsity-{sparsity:g}.png")
        lines.append(f"![allocations at sparsity {sparsity:g}]({picture.name})")
    return ["## Masks", "", "Layers x KV heads, dark = full attention.", "", *lines, ""] if lines else []


def _mask_title(label: str, allocation: Allocation) -> str:
    return (f"{label}: {method_label(allocation.method, allocation.granularity)}, "
            f"{allocation.num_full_units}/{allocation.num_units} units full attention")


def _series(rows: list[dict], value) -> dict[str, list[tuple[float, float]]]:
    """(sparsity, value) points per method of the non-dense rows whose ``value(row)`` is a finite number."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        y = value(row)
        if row["method"] != "dense" and isinstance(y, float | int) and math.isfinite(y):
            series.setdefault(method_label(row["method"], row["granularity"]), []).append((row["sparsity"], y))
    return series


def _one_per_target(rows: list[dict], keep) -> list[dict]:
    """The first row of each target (retrieval is measured once per target, whatever the sequence lengths)."""
    first: dict[str, dict] = {}
    for row in rows:
        if keep(row):
            first.setdefault(row["path"], row)
    return list(first.values())


def _delta(values: dict, reference: bool = False) -> str:
    if reference:
        return "ref"
    if "delta_nll_vs_dense" not in values:
        return "-"
    t_stat = values.get("paired_t_vs_dense")
    t_text = f"{t_stat:.1f}" if isinstance(t_stat, float) and math.isfinite(t_stat) else "-"
    return f"{values['delta_nll_vs_dense']:+.4f} (t {t_text})"


def _header(*columns: str) -> str:
    return _cells(*columns) + "\n" + "|" + "---|" * len(columns)


def _cells(*values) -> str:
    return "| " + " | ".join(str(value).replace("|", "\\|") for value in values) + " |"
