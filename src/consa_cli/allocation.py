"""The allocation: which attention units keep full attention. The one currency between search, export and eval.

An allocation is a boolean ``fa_mask`` of shape ``[num_layers, num_kv_heads]`` (True = full attention, False =
sliding window) plus the window settings it was chosen for. Layer-granularity allocations have identical rows.
On disk it is a safetensors file (tensor ``fa_mask``, optional ``scores``) whose metadata holds the settings as
JSON, so it can be read without unpickling anything.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from consa_cli import __version__

GRANULARITIES = ("layer", "kv-head", "kv-head-per-layer")
ALLOCATION_FILE = "allocation.safetensors"


class AllocationError(ValueError):
    """An allocation file is missing, corrupt, or does not fit the model it is used with."""


@dataclass
class Allocation:
    """Which (layer, KV head) units keep full attention.

    Parameters
    ----------
    fa_mask:
        Bool tensor ``[num_layers, num_kv_heads]``; True = full attention, False = sliding window (+ sinks).
    granularity:
        ``layer``, ``kv-head`` or ``kv-head-per-layer``: what one allocation unit is.
    sliding_window:
        Keys a sliding-window query sees, itself included (transformers' ``kv_idx > q_idx - W``).
    sink_tokens:
        Leading tokens every sliding-window query also sees.
    method:
        How it was chosen, e.g. ``learned``, ``rule:interleaved``, ``dense``.
    model:
        The model it was chosen for, as the user named it.
    model_fingerprint:
        Digest of the model's shape and a few weights, to refuse masks from another model.
    scores:
        Optional per-unit scores ``[num_units]`` (learned log_alpha); higher = more deserving of full attention.
    metadata:
        Anything else worth keeping: settings, statistics, versions.
    """

    fa_mask: torch.Tensor
    granularity: str
    sliding_window: int
    sink_tokens: int
    method: str = "learned"
    model: str = ""
    model_fingerprint: str = ""
    scores: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fa_mask = self.fa_mask.detach().to(torch.bool).cpu()
        if self.fa_mask.dim() != 2:
            raise AllocationError(f"fa_mask must be [num_layers, num_kv_heads], got shape {tuple(self.fa_mask.shape)}")
        if self.granularity not in GRANULARITIES:
            raise AllocationError(f"unknown granularity '{self.granularity}'; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "layer" and not bool((self.fa_mask == self.fa_mask[:, :1]).all()):
            raise AllocationError("a layer allocation must give every KV head of a layer the same attention type")
        if self.sliding_window < 1 or self.sink_tokens < 0:
            raise AllocationError("sliding_window must be >= 1 and sink_tokens >= 0")

    @property
    def num_layers(self) -> int:
        return self.fa_mask.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.fa_mask.shape[1]

    @property
    def unit_mask(self) -> torch.Tensor:
        """FA flag per allocation unit: one per layer, or one per (layer, KV head) in row-major order."""
        return self.fa_mask[:, 0] if self.granularity == "layer" else self.fa_mask.flatten()

    @property
    def num_units(self) -> int:
        return self.unit_mask.numel()

    @property
    def num_full_units(self) -> int:
        return int(self.unit_mask.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of units that use the sliding window."""
        return 1.0 - self.num_full_units / self.num_units

    @property
    def layer_is_full(self) -> list[bool]:
        """Per layer: does it keep full attention in every KV head (only meaningful for layer allocations)."""
        return [bool(row.all()) for row in self.fa_mask]

    @property
    def full_attention_fraction_by_layer(self) -> list[float]:
        return [float(row.float().mean()) for row in self.fa_mask]

    def describe(self) -> str:
        """A one-line summary, e.g. for logs."""
        return (
            f"{self.method} {self.granularity} allocation: {self.num_full_units}/{self.num_units} units full "
            f"attention (sparsity {self.sparsity:.3f}), window {self.sliding_window}, {self.sink_tokens} sinks"
        )

    def render_rows(self) -> list[str]:
        """One text row per layer: '#' full attention, '.' sliding window."""
        return ["".join("#" if full else "." for full in row.tolist()) for row in self.fa_mask]

    def settings_dict(self) -> dict[str, Any]:
        """Everything except the tensors, JSON-serialisable."""
        return {
            "granularity": self.granularity,
            "sliding_window": self.sliding_window,
            "sink_tokens": self.sink_tokens,
            "method": self.method,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "sparsity": self.sparsity,
            "num_full_units": self.num_full_units,
            "consa_version": __version__,
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> Path:
        """Write the allocation atomically as safetensors (``fa_mask`` tensor + JSON metadata)."""
        path = Path(path)
        tensors = {"fa_mask": self.fa_mask.to(torch.uint8).contiguous()}
        if self.scores is not None:
            tensors["scores"] = self.scores.detach().float().cpu().contiguous()
        metadata = {"consa_allocation": json.dumps(self.settings_dict(), sort_keys=True)}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        """Read an allocation written by :meth:`save` (a file, or a directory holding ``allocation.safetensors``)."""
        path = Path(path)
        if path.is_dir():
            path = path / ALLOCATION_FILE
        if not path.is_file():
            raise AllocationError(f"no allocation file at {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("consa_allocation")
        except (SafetensorError, OSError, ValueError) as error:
            raise AllocationError(f"{path} is not a readable safetensors allocation file ({error})") from None
        if raw is None or "fa_mask" not in tensors:
            raise AllocationError(f"{path} is a safetensors file but holds no consa allocation")
        try:
            settings = json.loads(raw)
            return cls(
                fa_mask=tensors["fa_mask"].bool(),
                granularity=settings["granularity"],
                sliding_window=int(settings["sliding_window"]),
                sink_tokens=int(settings["sink_tokens"]),
                method=settings.get("method", "learned"),
                model=settings.get("model", ""),
                model_fingerprint=settings.get("model_fingerprint", ""),
                scores=tensors.get("scores"),
                metadata=settings.get("metadata", {}),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise AllocationError(f"{path} has malformed consa metadata ({error})") from None

    def check_fits(self, num_layers: int, num_kv_heads: int, fingerprint: str | None = None) -> None:
        """Raise :class:`AllocationError` naming what differs when this allocation does not fit a model."""
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise AllocationError(
                f"allocation is for {self.num_layers} layers x {self.num_kv_heads} KV heads, but the model has "
                f"{num_layers} layers x {num_kv_heads} KV heads"
            )
        if fingerprint and self.model_fingerprint and fingerprint != self.model_fingerprint:
            raise AllocationError(
                f"allocation was made for another model (fingerprint {self.model_fingerprint}, "
                f"this model {fingerprint}; allocation model '{self.model}')"
            )


_TYPED_FRACTION_SLACK = 1e-3  # of one unit; see full_unit_count


def full_unit_count(num_units: int, sparsity: float) -> int:
    """How many units keep full attention at ``sparsity`` (fraction sliding).

    Rounded down: the target is a budget, so the sliding fraction is never below what was asked for -- up to
    a thousandth of a unit, because a fraction typed as a decimal is never exact: 8/9 typed as 0.8888889 leaves
    1.9999998 full units of 18 and means 2, not 1 (the achieved sparsity then differs from the typed one only in
    digits the user did not type).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise AllocationError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(math.floor((1.0 - sparsity) * num_units + _TYPED_FRACTION_SLACK))


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file owner-only (0600); give it the mode any new file gets under the user's umask,
        # so exports and reports on a shared machine are as readable as files written the ordinary way.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def full_heads_per_layer(num_kv_heads: int, sparsity: float) -> int:
    """FA heads per layer when every layer must have the same sliding ratio; exact or an error."""
    keep = (1.0 - sparsity) * num_kv_heads
    if abs(keep - round(keep)) > 1e-6:
        achievable = ", ".join(f"{1 - k / num_kv_heads:.3g}" for k in range(num_kv_heads + 1))
        raise AllocationError(
            f"kv-head-per-layer needs the same whole number of sliding heads in every layer: with "
            f"{num_kv_heads} KV heads, sparsity {sparsity} gives {keep * 1:.3g} full heads per layer; "
            f"use one of {achievable}, or --granularity kv-head"
        )
    return int(round(keep))


def rank_to_mask(scores: torch.Tensor, granularity: str, num_layers: int, num_kv_heads: int,
                 sparsity: float) -> torch.Tensor:
    """The exact-count FA mask ``[num_layers, num_kv_heads]`` that keeps the highest-scoring units at ``sparsity``.

    ``scores`` has one value per unit (:attr:`Allocation.unit_mask`'s order); ``kv-head-per-layer`` keeps the same
    count in every layer.
    """
    if granularity == "kv-head-per-layer":
        per_layer = scores.view(num_layers, num_kv_heads)
        keep = full_heads_per_layer(num_kv_heads, sparsity)
        mask = torch.zeros_like(per_layer, dtype=torch.bool)
        if keep:
            mask.scatter_(1, per_layer.topk(keep, dim=1, sorted=False).indices, True)
        return mask
    keep = full_unit_count(scores.numel(), sparsity)
    unit_mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if keep:
        unit_mask[scores.topk(keep, sorted=False).indices] = True
    if granularity == "layer":
        return unit_mask.unsqueeze(1).expand(num_layers, num_kv_heads).clone()
    return unit_mask.view(num_layers, num_kv_heads).clone()
