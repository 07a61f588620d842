"""Search checkpoints: the whole state of a search as one safetensors file, and stopping cleanly on signals.

A checkpoint holds the gates, the multipliers, the optimiser state and the noise generator's state, so a
resumed search continues bit for bit where it stopped. It is written atomically and never pickled.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from consa_cli.allocation import write_atomically
from consa_cli.settings import SettingsError

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1  # raised when the checkpoint layout changes, so an old file is refused, not misread


class CheckpointError(SettingsError):
    """What ``--resume`` names cannot be continued: no checkpoint, an unreadable one, or another model's or
    data's."""


class SearchInterrupted(Exception):
    """SIGINT or SIGTERM stopped the search after a completed step, whose checkpoint is saved in ``run_dir``."""

    def __init__(self, step: int, steps: int, run_dir: Path, signal_number: int):
        super().__init__(f"interrupted at step {step} of {steps}; checkpoint saved in {run_dir}")
        self.step = step
        self.steps = steps
        self.run_dir = run_dir
        self.signal_number = signal_number


@dataclass
class CheckpointState:
    """Everything a search needs to continue exactly where it stopped, after ``step`` completed steps.

    The optimiser states are ``torch.optim.Optimizer.state_dict()["state"]``: per parameter index, Adam's
    ``exp_avg``, ``exp_avg_sq`` and ``step`` for the gates; nothing for the multipliers' SGD, which has no
    momentum.
    Their hyperparameters are not kept: they come from the settings, so a resumed run may change the rates.
    """

    step: int
    settings: dict[str, Any]
    model_fingerprint: str
    data_fingerprint: str
    log_alpha: torch.Tensor
    lagrange_linear: torch.Tensor
    lagrange_quadratic: torch.Tensor
    gate_optimizer: dict[int, dict[str, torch.Tensor]]
    multiplier_optimizer: dict[int, dict[str, torch.Tensor]]
    generator_state: torch.Tensor  # the gate-noise generator's uint8 state
    resumes: list[dict] = field(default_factory=list)  # per earlier resume: at which step, which settings changed


OPTIMIZERS = ("gate_optimizer", "multiplier_optimizer")


def save_checkpoint(path: Path, state: CheckpointState) -> None:
    """Write ``state`` as safetensors: tensors as tensors, the rest as JSON metadata; never pickle.

    Atomic (a temp file renamed into place), so a kill or a second Ctrl-C mid-write leaves the previous checkpoint.
    """
    tensors = {"log_alpha": state.log_alpha, "lagrange_linear": state.lagrange_linear,
               "lagrange_quadratic": state.lagrange_quadratic, "generator_state": state.generator_state}
    for name in OPTIMIZERS:
        for index, values in getattr(state, name).items():
            tensors.update({f"{name}.{index}.{key}": value for key, value in values.items()})
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    metadata = {"consa_checkpoint": json.dumps({
        "format": CHECKPOINT_FORMAT, "step": state.step, "settings": state.settings,
        "model_fingerprint": state.model_fingerprint, "data_fingerprint": state.data_fingerprint,
        "resumes": state.resumes}, sort_keys=True)}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(run_dir: str | Path) -> CheckpointState:
    """Read the checkpoint :func:`save_checkpoint` wrote into ``run_dir``."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        where = (f"{run_dir} has no {CHECKPOINT_FILE}" if Path(run_dir).is_dir()
                 else f"no run directory at {run_dir}")
        raise CheckpointError(f"{where}; --resume continues a run of `consa search` from its checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["consa_checkpoint"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if meta["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {meta['format']}; this consa reads format "
                                  f"{CHECKPOINT_FORMAT}")
        optimizers: dict[str, dict[int, dict[str, torch.Tensor]]] = {name: {} for name in OPTIMIZERS}
        for key, tensor in tensors.items():
            name, _, rest = key.partition(".")
            if name in optimizers:
                index, _, value_name = rest.partition(".")
                optimizers[name].setdefault(int(index), {})[value_name] = tensor
        return CheckpointState(
            step=int(meta["step"]), settings=meta["settings"], model_fingerprint=meta["model_fingerprint"],
            data_fingerprint=meta["data_fingerprint"], log_alpha=tensors["log_alpha"],
            lagrange_linear=tensors["lagrange_linear"], lagrange_quadratic=tensors["lagrange_quadratic"],
            generator_state=tensors["generator_state"], resumes=meta["resumes"], **optimizers,
        )
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable consa checkpoint ({error})") from None


def data_fingerprint(sequences: torch.Tensor) -> str:
    """A short digest of the calibration tokens, so a resumed run refuses data that changed since it began."""
    return hashlib.sha256(sequences.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@contextmanager
def deferred_stop_signals(active: bool) -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM only append themselves to the yielded list, so the step under way can
    finish and be checkpointed.

    The first signal also puts the previous handlers back, so a second one stops the process at once (which
    cannot corrupt the checkpoint: it is written atomically). Signals the process ignores stay ignored, and
    only the main thread may set handlers, so elsewhere signals keep their usual effect. The previous handlers
    are restored on exit either way.
    """
    received: list[int] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler != signal.SIG_IGN:  # e.g. SIGINT of a background job: whoever ignored it meant it
            # None is a handler set outside Python; the default action is the closest restorable one.
            previous[number] = signal.SIG_DFL if handler is None else handler

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def note(number: int, frame: object) -> None:
        received.append(number)
        restore()

    for number in previous:
        signal.signal(number, note)
    try:
        yield received
    finally:
        restore()
