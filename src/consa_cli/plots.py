"""Pictures of allocations, for people who would rather look than read. Needs matplotlib (``.[plot]``)."""

from __future__ import annotations

from pathlib import Path

from consa_cli.allocation import Allocation


class PlotError(RuntimeError):
    """matplotlib is missing or the picture cannot be written."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'consa-cli[plot]'") from None
    return plt


def require_matplotlib() -> None:
    """Raise :class:`PlotError` now if pictures cannot be drawn (before an evaluation that ends with them)."""
    _pyplot()


def plot_allocation(allocation: Allocation, path: str | Path, title: str | None = None) -> Path:
    """Write a layers x KV-heads heatmap of ``allocation`` (dark = full attention) to ``path`` (PNG/SVG/PDF).

    When the allocation carries learned scores, a second panel shows log_alpha per unit, so one can see how
    decisive the ranking was.
    """
    plt = _pyplot()
    mask = allocation.fa_mask.float().T.numpy()  # KV heads on the y axis, layers along x
    panels = 2 if allocation.scores is not None else 1
    width = max(6.0, 0.22 * allocation.num_layers + 2)
    figure, axes = plt.subplots(panels, 1, figsize=(width, 1.2 + 0.45 * allocation.num_kv_heads * panels),
                                squeeze=False)
    axes = axes[:, 0]
    axes[0].imshow(mask, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axes[0].set_ylabel("KV head")
    axes[0].set_title(title or allocation.describe(), fontsize=9)
    if allocation.scores is not None:
        scores = allocation.scores.float()
        grid = (scores.unsqueeze(1).expand(-1, allocation.num_kv_heads) if allocation.granularity == "layer"
                else scores.view(allocation.num_layers, allocation.num_kv_heads)).T.numpy()
        image = axes[1].imshow(grid, cmap="RdBu", aspect="auto", interpolation="nearest",
                               vmin=-abs(grid).max(), vmax=abs(grid).max())
        axes[1].set_ylabel("KV head")
        axes[1].set_title("learned log_alpha (blue: keep full attention)", fontsize=9)
        figure.colorbar(image, ax=axes[1], fraction=0.02, pad=0.01)
    for axis in axes:
        axis.set_xticks(range(allocation.num_layers))
        axis.set_xticklabels([str(i) if i % 5 == 0 else "" for i in range(allocation.num_layers)], fontsize=7)
        axis.set_yticks(range(allocation.num_kv_heads))
    axes[-1].set_xlabel("layer")
    return _save(plt, figure, path)


def plot_masks(panels: list[tuple[str, Allocation]], path: str | Path) -> Path:
    """Write several allocations' layers x KV-heads masks stacked in one picture (dark = full attention), so a
    learned mask can be read next to the rules at the same sparsity."""
    if not panels:
        raise PlotError("no allocation to draw")
    plt = _pyplot()
    num_layers = max(allocation.num_layers for _, allocation in panels)
    heights = [0.45 + 0.3 * allocation.num_kv_heads for _, allocation in panels]
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.22 * num_layers + 2), 0.6 + sum(heights)),
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for axis, (title, allocation) in zip(axes[:, 0], panels, strict=True):
        axis.imshow(allocation.fa_mask.float().T.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto",
                    interpolation="nearest")
        axis.set_title(title, fontsize=8, loc="left")
        axis.set_yticks(range(allocation.num_kv_heads))
        axis.set_xticks(range(allocation.num_layers))
        axis.set_xticklabels([str(i) if i % 5 == 0 else "" for i in range(allocation.num_layers)], fontsize=7)
    axes[-1, 0].set_xlabel("layer (rows: KV heads)")
    return _save(plt, figure, path)


def plot_versus_sparsity(series: dict[str, list[tuple[float, float]]], path: str | Path, ylabel: str, title: str,
                         reference: float | None = None, reference_label: str = "dense") -> Path:
    """One line per method through its (sparsity, value) points, e.g. the perplexity / accuracy Pareto front.

    ``reference`` draws the dense model's value as a dashed horizontal line.
    """
    plt, figure, axis = _figure(series, title)
    for index, (label, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*sorted(points), strict=True)
        axis.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], label=label)
    _finish(axis, "sparsity (fraction of units with a sliding window)", ylabel, title, reference, reference_label)
    return _save(plt, figure, path)


def plot_tradeoff(groups: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str,
                  title: str, reference: float | None = None, reference_label: str = "dense") -> Path:
    """One marker per point, one colour per group: e.g. each allocation's perplexity cost against its retrieval,
    where the good ones sit top left. ``reference`` draws the dense model's value as a dashed horizontal line."""
    plt, figure, axis = _figure(groups, title)
    for index, (label, points) in enumerate(sorted(groups.items())):
        if points:
            xs, ys = zip(*points, strict=True)
            axis.scatter(xs, ys, marker=MARKERS[index % len(MARKERS)], label=f"{label} ({len(points)})", alpha=0.8)
    _finish(axis, xlabel, ylabel, title, reference, reference_label)
    return _save(plt, figure, path)


MARKERS = "osD^v<>pPX*h"


def _figure(series: dict[str, list], title: str):
    """``(pyplot, figure, axis)`` for a chart of ``series``; nothing to draw is an error."""
    if not any(series.values()):
        raise PlotError(f"nothing to plot for {title}")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    return plt, figure, axis


def _finish(axis, xlabel: str, ylabel: str, title: str, reference: float | None, reference_label: str) -> None:
    """Labels, grid, legend, and the dense model's value as a dashed line."""
    if reference is not None:
        axis.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _save(plt, figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)
    return path
