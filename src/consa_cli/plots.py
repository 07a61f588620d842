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


def plot_allocation(allocation: Allocation, path: str | Path, title: str | None = None) -> Path:
    """Write a layers x KV-heads heatmap of ``allocation`` (dark = full attention) to ``path`` (PNG/SVG/PDF).

    When the allocation carries learned scores, a second panel shows log_alpha per unit, so one can see how
    decisive the ranking was.
    """
    plt = _pyplot()
    path = Path(path)
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
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)
    return path
