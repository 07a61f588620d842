"""``consa search``: learn which units keep full attention under an exact sparsity target.

Method (ConSA, arXiv 2606.18056): one hard-concrete gate per unit (Louizos et al. 2018) decides between full
attention (z = 1) and sliding-window attention (z = 0); during search a unit outputs ``z * FA + (1 - z) * SWA``.
The expected sliding fraction E[s] is differentiable in the gates' log_alpha, and an augmented Lagrangian
``lambda * (E[s] - t) + phi * (E[s] - t)^2`` whose multipliers rise by gradient ascent drives it to the target t.
Model weights stay frozen. The final mask ranks log_alpha so the requested count is hit exactly.

A search survives interruption: it checkpoints its whole state (gates, multipliers, optimiser state, noise
generator) into the run directory, atomically, and ``--resume`` continues bit for bit where it stopped.

``--seeds N`` runs N such searches, one per seed, and writes the vote over their allocations (:func:`search_seeds`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from consa_cli.allocation import (
    ALLOCATION_FILE,
    Allocation,
    full_heads_per_layer,
    rank_to_mask,
    write_atomically,
)
from consa_cli.attention import (
    ATTENTION_BACKENDS,
    install_hybrid,
    original_attention,
    remove_hybrid,
    set_fa_weights,
)
from consa_cli.baselines import native_allocation, native_sparsity
from consa_cli.calibration import CalibrationSet, answered_by, mix_retrieval
from consa_cli.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    CheckpointState,
    SearchInterrupted,
    data_fingerprint,
    deferred_stop_signals,
    save_checkpoint,
)
from consa_cli.kernels import fa4_supported, flash_supported, flex_supported
from consa_cli.losses import loss_kernels, plan_search_loss, search_loss
from consa_cli.models import DEFAULT_MODEL
from consa_cli.settings import RESUMABLE, SearchSettings, SettingsError, settings_to_dict
from consa_cli.teacher import TeacherCache, remaining_visits

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


class HardConcreteGates(nn.Module):
    """One hard-concrete gate per allocation unit; z = 1 means full attention.

    Parameters
    ----------
    num_units:
        Number of gates.
    log_alpha_init:
        Initial location; +5 starts every unit (almost surely) at full attention, as in the paper.
    temperature, stretch_low, stretch_high:
        Hard-concrete shape: a concrete variable with temperature ``temperature`` stretched to
        ``(stretch_low, stretch_high)`` and clamped to [0, 1], so exact 0 and 1 have non-zero probability.
    """

    def __init__(self, num_units: int, log_alpha_init: float = 5.0, temperature: float = 2.0 / 3.0,
                 stretch_low: float = -0.1, stretch_high: float = 1.1):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_units,), float(log_alpha_init)))
        self.temperature = temperature
        self.stretch_low = stretch_low
        self.stretch_high = stretch_high

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A relaxed, differentiable gate sample in [0, 1] per unit."""
        u = torch.rand(self.log_alpha.shape, generator=generator).to(self.log_alpha.device)
        u = u.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.stretch_high - self.stretch_low) + self.stretch_low).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The gate value at test time (no noise)."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.stretch_high - self.stretch_low) + self.stretch_low).clamp(0.0, 1.0)

    def prob_full(self) -> torch.Tensor:
        """P(z > 0) per unit: the probability a unit keeps (some) full attention; its expected L0 norm."""
        shift = self.temperature * math.log(-self.stretch_low / self.stretch_high)
        return torch.sigmoid(self.log_alpha - shift)


class ScalarGates(nn.Module):
    """Deterministic gates ``sigmoid(log_alpha)`` in [0, 1]: the scalar-gate + L1 ablation (DuoAttention / LoZA).

    Same interface as :class:`HardConcreteGates` so the search loop, checkpoints and ranking are shared; there is
    no noise and no exact zero, so the final count comes from ranking alone.
    """

    def __init__(self, num_units: int, log_alpha_init: float = 5.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_units,), float(log_alpha_init)))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha)

    def deterministic(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha)

    def prob_full(self) -> torch.Tensor:
        """The gate values themselves: their mean is the soft fraction of full attention."""
        return torch.sigmoid(self.log_alpha)


@dataclass(frozen=True)
class UnitLayout:
    """How allocation units map onto (layer, KV head) and onto sparsity constraints."""

    granularity: str
    num_layers: int
    num_kv_heads: int

    @property
    def num_units(self) -> int:
        return self.num_layers if self.granularity == "layer" else self.num_layers * self.num_kv_heads

    @property
    def num_constraints(self) -> int:
        return self.num_layers if self.granularity == "kv-head-per-layer" else 1

    def to_fa_weights(self, unit_values: torch.Tensor) -> torch.Tensor:
        """Unit values ``[num_units]`` -> per (layer, KV head) ``[L, H]``."""
        if self.granularity == "layer":
            return unit_values.unsqueeze(1).expand(self.num_layers, self.num_kv_heads)
        return unit_values.view(self.num_layers, self.num_kv_heads)

    def constraint_sparsity(self, prob_full: torch.Tensor) -> torch.Tensor:
        """Expected sliding fraction per constraint ``[num_constraints]``."""
        if self.granularity == "kv-head-per-layer":
            return 1.0 - prob_full.view(self.num_layers, self.num_kv_heads).mean(dim=1)
        return (1.0 - prob_full.mean()).unsqueeze(0)

    def rank_to_mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Exact-count FA mask ``[L, H]`` keeping the highest-scoring units (per layer for the per-layer scope)."""
        return rank_to_mask(scores, self.granularity, self.num_layers, self.num_kv_heads, sparsity)


@dataclass
class SearchResult:
    allocation: Allocation
    metrics: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    first_step: int = 0  # steps done before this call, by the run it resumed


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The attention backend a search runs with: ``auto`` becomes flex on a CUDA device that has it, else sdpa.

    ``dtype`` is the model's, when known: the flash backend runs only in half precision.
    """
    if name == "auto":
        return "flex" if flex_supported(device) else "sdpa"
    if name == "flex" and not flex_supported(device):
        raise SettingsError(f"--attention-backend {name} needs a CUDA device with triton (FlexAttention has no CPU "
                            f"backward), not {device}; use sdpa")
    if name == "fa4" and not fa4_supported(device, dtype):
        raise SettingsError(f"--attention-backend {name} needs a CUDA GPU of compute capability 9.0+ (Hopper or "
                            f"newer), --dtype bfloat16 or float16, and the flash-attn-4 package (pip install "
                            f"flash-attn-4), not {device} / {dtype}; use flex or sdpa")
    if name == "flash" and not flash_supported(device, dtype):
        raise SettingsError(f"--attention-backend {name} needs a CUDA GPU with flash attention (compute capability "
                            f"8.0+) and --dtype bfloat16 or float16, not {device} / {dtype}; use sdpa")
    return name


# From this many tokens per step (batch size x sequence length) a CUDA search skips closed gates' full branch by
# default: on an H200 it made the step faster at one 8192-token sequence in every paired round (LM loss 0.85-0.90x
# the dense step against 0.79-0.84x, KL +3-14%; session 11) and at two 4096-token sequences (4 of 4 pairs, session
# 14), and slower at one 4096-token sequence in most, where the step is bound by the host (docs/benchmarks.md); on a
# CPU it saved nothing measurable.
SKIP_CLOSED_GATES_MIN_TOKENS = 8192


# The attention backends whose captured step a CUDA test checks against the eager search (tests/test_search.py).
CUDA_GRAPH_BACKENDS = ("flex", "sdpa")


def uses_cuda_graphs(settings: SearchSettings, device: torch.device, attention_backend: str) -> bool:
    """Whether the search captures its gated forward and backward as CUDA graphs: ``--cuda-graphs`` as given, or by
    default (None) on CUDA with the flex or sdpa backend, unless ``--compile`` or ``--skip-closed-gates`` asks for
    another way. Measured on an H200 (docs/benchmarks.md, session 18): the step went from 0.61-0.85x to 0.89-1.23x
    of the dense step at 4096 and 8192 tokens, because the host then launches one graph, not every kernel."""
    if settings.cuda_graphs is not None:
        return settings.cuda_graphs
    return (device.type == "cuda" and attention_backend in CUDA_GRAPH_BACKENDS and not settings.compile
            and not settings.skip_closed_gates)


def skips_closed_gates(settings: SearchSettings, device: torch.device, tokens_per_step: int) -> bool:
    """Whether a search with ``tokens_per_step`` tokens per step (batch size x sequence length) on ``device``
    computes the full branch only for open gates: ``--skip-closed-gates`` as given, or by default (None) on CUDA
    from :data:`SKIP_CLOSED_GATES_MIN_TOKENS` tokens per step, not with ``--compile``. Measured to pay at one
    8192-token sequence and at two of 4096 per step, to lose at one of 4096 (docs/benchmarks.md, sessions 11 and
    14). Only the l0 method has gates that close (scalar-l1's sigmoid never reaches 0). Either way the search
    computes the same losses and gradients; this only decides the work."""
    if settings.method != "l0":
        return False
    if settings.skip_closed_gates is not None:
        return settings.skip_closed_gates
    return device.type == "cuda" and not settings.compile and tokens_per_step >= SKIP_CLOSED_GATES_MIN_TOKENS


def target_at(step: int, settings: SearchSettings) -> float:
    """Target sparsity at ``step``: a linear ramp from 0 over the warm-up, then the requested target."""
    if settings.target_warmup_steps == 0:
        return settings.sparsity
    return settings.sparsity * min(1.0, (step + 1) / settings.target_warmup_steps)


def compile_forward(model: nn.Module):
    """The model's forward through torch.compile (``--compile``), for the gated student and the KL teacher: two
    graphs for a whole run, one per attention implementation and grad mode (the relaxed weights are tensors read
    from the attention modules, so a new gate sample is a new input, not a recompile); the sequence length is
    fixed within a run, so shapes are static."""
    return torch.compile(model, dynamic=False)


class GatedLogits(nn.Module):
    """The gated model's logits as a function of ``input_ids``, its relaxed weights a leaf parameter
    ``fa_weights`` (float32 ``[L, H]``, the only tensor that needs a gradient): what ``--cuda-graphs`` captures.
    Each step copies its weights into the leaf, replays the graphs, and sends the gradient the backward leaves on
    the leaf on through the gate sample to ``log_alpha`` -- by the chain rule the gradient of the plain step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config, device = model.config, next(model.parameters()).device
        self.fa_weights = nn.Parameter(torch.ones(config.num_hidden_layers, config.num_key_value_heads,
                                                  device=device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Each layer's row of the leaf is taken here, inside the forward: rows taken outside it put their backward
        # on the stream they were made on, which a captured backward cannot depend on (cudaErrorStreamCaptureImplicit).
        set_fa_weights(self.model, self.fa_weights)
        return self.model(input_ids=input_ids, use_cache=False).logits


def graph_gated_logits(gated: GatedLogits, sample_ids: torch.Tensor):
    """``gated`` captured as CUDA graphs (forward and backward) on ``sample_ids``'s shape: a callable that copies
    its input into the graphs' static input and replays them (torch.cuda.make_graphed_callables)."""
    if sample_ids.device.type != "cuda":
        raise SettingsError("--cuda-graphs needs a CUDA device")
    return torch.cuda.make_graphed_callables(gated, (sample_ids,))


def step_batch(order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The calibration rows of ``step``: the next ``batch_size`` entries of the data order, wrapping around."""
    return torch.stack([order[(step * batch_size + i) % len(order)] for i in range(batch_size)])


def run_search(
    settings: SearchSettings,
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    sink_tokens: int,
    model_fingerprint: str = "",
    on_step: Callable[[dict], None] | None = None,
    metrics_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: CheckpointState | None = None,
) -> SearchResult:
    """Learn an allocation for ``model`` (frozen) on ``calibration`` (or plain text sequences ``[N, seq_len]``).

    ``on_step`` receives each step's metrics (for progress display); ``metrics_path`` gets them as JSONL.
    With ``checkpoint_dir``, ``checkpoint.safetensors`` is written there every ``settings.checkpoint_every``
    steps and after the last, and SIGINT/SIGTERM end the search after the step under way with a checkpoint and
    :class:`SearchInterrupted`. ``resume`` continues from such a checkpoint (same model, data and settings but
    :data:`~consa_cli.settings.RESUMABLE`): ``metrics_path`` is cut back to the checkpoint's steps and extended,
    and the result's metrics include those earlier steps.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    config = model.config
    layout = UnitLayout(settings.granularity, config.num_hidden_layers, config.num_key_value_heads)
    if settings.granularity == "kv-head-per-layer":
        full_heads_per_layer(layout.num_kv_heads, settings.sparsity)  # fail before any compute
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    if settings.method == "scalar-l1":
        gates = ScalarGates(layout.num_units, settings.log_alpha_init).to(device)
    else:
        gates = HardConcreteGates(layout.num_units, settings.log_alpha_init, settings.temperature,
                                  settings.stretch_low, settings.stretch_high).to(device)
    natively_sliding = ~native_allocation(config).fa_mask  # [L, H_kv]: the model's own sliding layers (Gemma3)
    if natively_sliding.any():
        # A natively hybrid model starts the search as it was trained: its sliding layers' gates start closed.
        # All-full attention is another model for it (Gemma3-270M: PPL 24.6 -> 371 at 2048 tokens), and gates
        # saturated open there got no gradient back to the native layers (docs/results.md 1h).
        units = natively_sliding[:, 0] if layout.granularity == "layer" else natively_sliding.flatten()
        with torch.no_grad():
            gates.log_alpha[units.to(device)] = -abs(settings.log_alpha_init)
    lagrange_linear = nn.Parameter(torch.zeros(layout.num_constraints, device=device))
    lagrange_quadratic = nn.Parameter(torch.full((layout.num_constraints,), float(settings.penalty_init), device=device))
    gate_optimizer = torch.optim.Adam(gates.parameters(), lr=settings.gate_lr)
    multiplier_optimizer = torch.optim.SGD([lagrange_linear, lagrange_quadratic], lr=settings.multiplier_lr,
                                           maximize=True)
    # The data order is drawn first; a resumed run draws it the same way and only then takes over the generator's
    # saved state, so the remaining steps see exactly the sequences and gate noise the uninterrupted run would.
    if not isinstance(calibration, CalibrationSet):
        calibration = CalibrationSet.text_only(calibration)
    order = torch.randperm(calibration.sequences.shape[0], generator=generator)
    # Text-only data keep the fingerprint of the tokens alone, so runs checkpointed before loss masks existed resume.
    fingerprint_of_data = data_fingerprint(calibration.sequences if calibration.loss_mask.all() else
                                           torch.cat([calibration.sequences, calibration.loss_mask.long()]))
    first_step, resumes, metrics = 0, [], []
    if resume is not None:
        _restore(resume, settings, model_fingerprint, fingerprint_of_data, gates, lagrange_linear,
                 lagrange_quadratic, gate_optimizer, multiplier_optimizer, generator)
        first_step = resume.step
        changed = {name: [resume.settings.get(name), getattr(settings, name)] for name in RESUMABLE
                   if resume.settings.get(name) != getattr(settings, name)}
        resumes = [*resume.resumes, {"step": resume.step, "changed": changed}]
        if metrics_path is not None:
            metrics = _metrics_up_to(metrics_path, resume.step)
    checkpointed_step = resume.step if resume is not None else None

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_dir / CHECKPOINT_FILE, CheckpointState(
            step=step, settings=settings_to_dict(settings), model_fingerprint=model_fingerprint,
            data_fingerprint=fingerprint_of_data, log_alpha=gates.log_alpha, lagrange_linear=lagrange_linear,
            lagrange_quadratic=lagrange_quadratic, gate_optimizer=gate_optimizer.state_dict()["state"],
            multiplier_optimizer=multiplier_optimizer.state_dict()["state"], generator_state=generator.get_state(),
            resumes=resumes,
        ))

    for param in model.parameters():
        param.requires_grad_(False)
    # On the CPU: the attention function reads a hard mask's all-full / all-sliding shortcut without a device sync.
    all_full = torch.ones(layout.num_layers, layout.num_kv_heads, dtype=torch.bool)
    attention_backend = resolve_attention_backend(settings.attention_backend, device, next(model.parameters()).dtype)
    # Calibration rows are never padded: no mask function, so no T x T mask under CUDA graphs or --compile either.
    install_hybrid(model, all_full, settings.window, sink_tokens, attention_backend, padding_masks=False)
    forward = model
    cuda_graphs = uses_cuda_graphs(settings, device, attention_backend)
    skip_closed = not cuda_graphs and skips_closed_gates(settings, device,
                                                         settings.batch_size * calibration.sequences.shape[1])
    gated = graphed = None
    if cuda_graphs:
        gated = GatedLogits(model)
        # Captured on the first step's sequences (the warm-up passes draw no gate noise): every step has this shape.
        first = step_batch(order, first_step, settings.batch_size)
        graphed = graph_gated_logits(gated, calibration.sequences[first].to(device))
    if settings.compile:
        prepare = ATTENTION_BACKENDS[attention_backend].prepare
        if prepare is not None:  # e.g. flex's block mask, which the graph then reads instead of rebuilding
            prepare(calibration.sequences.shape[1], settings.window, sink_tokens, device, batch=settings.batch_size)
        forward = compile_forward(model)
    is_kl = [(settings.retrieval_loss if retrieval else settings.loss) == "kl"
             for retrieval in calibration.is_retrieval.tolist()]
    teacher = None
    if any(is_kl):
        decoder = model.base_model
        decoder_forward = compile_forward(decoder) if settings.compile else decoder

        def teacher_hidden(ids: torch.Tensor) -> torch.Tensor:
            # Its own attention, not all-full: for a natively hybrid model (Gemma3) that is its own pattern.
            with torch.no_grad(), original_attention(model):
                return decoder_forward(input_ids=ids, use_cache=False).last_hidden_state

        teacher = TeacherCache(model, teacher_hidden,
                               remaining_visits(order, settings.batch_size, first_step, settings.steps, is_kl),
                               int(settings.teacher_cache_gib * 2**30))
    metrics_file = metrics_path.open("a" if resume is not None else "w") if metrics_path is not None else None
    try:
        with deferred_stop_signals(active=checkpoint_dir is not None) as stop_signals:
            for step in range(first_step, settings.steps):
                step_started = time.perf_counter()
                batch_idx = step_batch(order, step, settings.batch_size)
                # Everything the host must know or copy for this step comes first, while the device is idle: a host
                # read or copy from pageable memory waits for all queued work, and a host that waits cannot queue
                # the next kernels ahead of the device (at 4096 tokens the step is bound by the host; benchmarks.md).
                losses = [settings.retrieval_loss if retrieval else settings.loss
                          for retrieval in calibration.is_retrieval[batch_idx].tolist()]
                input_ids = calibration.sequences[batch_idx].to(device)
                loss_plan = plan_search_loss(calibration.loss_mask[batch_idx], losses, device)
                z = gates.sample(generator)
                weights = layout.to_fa_weights(z)
                # One host read per step: which heads' gates are not closed (scalar-l1's sigmoid never closes one).
                open_heads = (weights.detach() > 0).cpu() if skip_closed else None
                if gated is not None:
                    with torch.no_grad():
                        gated.fa_weights.copy_(weights)
                    gated.fa_weights.grad = None
                else:
                    set_fa_weights(model, weights, open_heads)

                teacher_logits = None
                kl_rows = [row for row, loss in enumerate(losses) if loss == "kl"]
                if kl_rows:  # the original model's predictions, for the sequences whose loss has a teacher
                    teacher_ids = input_ids if len(kl_rows) == len(losses) else input_ids[kl_rows]
                    teacher_logits = teacher.logits([int(batch_idx[row]) for row in kl_rows], teacher_ids)

                if graphed is not None:
                    logits = graphed(input_ids)
                else:
                    logits = forward(input_ids=input_ids, use_cache=False).logits
                task_loss = search_loss(logits, input_ids, None, losses, teacher_logits, plan=loss_plan)

                target = target_at(step, settings)
                expected = layout.constraint_sparsity(gates.prob_full())
                gap = expected - target
                if settings.method == "scalar-l1":
                    # The ablation: no constraint, an L1 pull towards sliding on every gate; the count is set by ranking.
                    constraint = settings.l1_weight * z.mean()
                else:
                    constraint = (lagrange_linear * gap + lagrange_quadratic * gap.pow(2)).sum()
                loss = task_loss + constraint

                gate_optimizer.zero_grad(set_to_none=True)
                multiplier_optimizer.zero_grad(set_to_none=True)
                if gated is None:
                    loss.backward()
                else:  # the task loss through the graphs to the leaf, then on through the sample with the constraint
                    task_loss.backward()
                    torch.autograd.backward([constraint, weights], [None, gated.fa_weights.grad])
                # Checked after the backward (a check before it would stall the host between the two passes) and
                # before the update, so the gates stay the last good ones.
                if not torch.isfinite(loss):
                    raise FloatingPointError(_non_finite_message(loss.item(), step + 1, settings, checkpoint_dir,
                                                                 checkpointed_step))
                gate_optimizer.step()
                multiplier_optimizer.step()
                record = {
                    "step": step + 1,
                    "loss": round(loss.item(), 6),
                    "task_loss": round(task_loss.item(), 6),
                    "expected_sparsity": round(1.0 - gates.prob_full().mean().item(), 6),
                    "target_sparsity": round(target, 6),
                    "constraint_gap_max": round(gap.abs().max().item(), 6),
                    "lambda": round(lagrange_linear.mean().item(), 6),
                    "phi": round(lagrange_quadratic.mean().item(), 6),
                    "full_units_threshold": int((gates.log_alpha > 0).sum().item()),
                    "seconds": round(time.perf_counter() - step_started, 3),
                }
                if open_heads is not None:  # the share of (layer, KV head) pairs that skipped the full branch
                    record["closed_heads"] = round(1.0 - open_heads.float().mean().item(), 6)
                metrics.append(record)
                if metrics_file is not None:  # before the checkpoint: the file never lags behind it
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if on_step is not None:
                    on_step(record)
                every = settings.checkpoint_every
                if checkpoint_dir is not None and (stop_signals or step + 1 == settings.steps
                                                   or (every and (step + 1) % every == 0)):
                    checkpoint(step + 1)
                    checkpointed_step = step + 1
                if stop_signals:
                    raise SearchInterrupted(step + 1, settings.steps, checkpoint_dir, stop_signals[0])
    finally:
        remove_hybrid(model)
        if metrics_file is not None:
            metrics_file.close()
        if graphed is not None:  # the graphs' private memory pool goes now, not at some later collection
            gated = graphed = None
            gc.collect()
            torch.cuda.empty_cache()

    scores = gates.log_alpha.detach().float().cpu()
    allocation = Allocation(
        fa_mask=layout.rank_to_mask(scores, settings.sparsity),
        granularity=settings.granularity,
        sliding_window=settings.window,
        sink_tokens=sink_tokens,
        method="learned" if settings.method == "l0" else f"learned:{settings.method}",
        model=settings.model or DEFAULT_MODEL,
        model_fingerprint=model_fingerprint,
        scores=scores,
    )
    threshold_units = scores > 0  # the paper's binarisation, which need not hit the target count
    allocation.metadata = {
        "settings": settings_to_dict(settings),
        "full_units_threshold": int(threshold_units.sum()),
        "units_where_ranking_differs_from_threshold": int((allocation.unit_mask != threshold_units).sum()),
        "final_expected_sparsity": 1.0 - gates.prob_full().mean().item(),
        "attention_backend": attention_backend,
        "loss_kernels": loss_kernels(device),
        "skip_closed_gates": skip_closed,
        "cuda_graphs": cuda_graphs,
    }
    if teacher is not None:  # teacher forwards run, and those a kept hidden state made unnecessary
        allocation.metadata["teacher_forwards"] = {"computed": teacher.computed, "recalled": teacher.recalled}
    if resumes:
        allocation.metadata["resumes"] = resumes
    return SearchResult(allocation=allocation, metrics=metrics, seconds=time.perf_counter() - started,
                        first_step=first_step)


def _restore(resume: CheckpointState, settings: SearchSettings, model_fingerprint: str, fingerprint_of_data: str,
             gates: HardConcreteGates, lagrange_linear: nn.Parameter, lagrange_quadratic: nn.Parameter,
             gate_optimizer: torch.optim.Optimizer, multiplier_optimizer: torch.optim.Optimizer,
             generator: torch.Generator) -> None:
    """Load a checkpoint's state into a freshly set-up search, after checking it belongs to this model and data."""
    if model_fingerprint and resume.model_fingerprint and model_fingerprint != resume.model_fingerprint:
        raise CheckpointError(f"the checkpoint was made for another model (fingerprint {resume.model_fingerprint}, "
                              f"this model {model_fingerprint})")
    if resume.data_fingerprint != fingerprint_of_data:
        raise CheckpointError(f"the calibration data differ from the checkpoint's ({settings.data} changed since "
                              "the run began?)")
    if (resume.log_alpha.shape, resume.lagrange_linear.shape) != (gates.log_alpha.shape, lagrange_linear.shape):
        raise CheckpointError(f"the checkpoint has {resume.log_alpha.numel()} units, this search "
                              f"{gates.log_alpha.numel()}")
    with torch.no_grad():
        gates.log_alpha.copy_(resume.log_alpha)
        lagrange_linear.copy_(resume.lagrange_linear)
        lagrange_quadratic.copy_(resume.lagrange_quadratic)
        if settings.penalty_init != resume.settings.get("penalty_init"):  # a new --penalty-init restarts phi
            lagrange_quadratic.fill_(settings.penalty_init)
    for optimizer, state in ((gate_optimizer, resume.gate_optimizer),
                             (multiplier_optimizer, resume.multiplier_optimizer)):
        # The hyperparameters stay the ones built from the settings, which may carry new rates.
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(resume.generator_state)


def _metrics_up_to(path: Path, step: int) -> list[dict]:
    """The first ``step`` records of a run's metrics file, which is cut back to them.

    A killed run may have logged steps after its last checkpoint; the resumed run does those steps again.
    """
    lines = path.read_text().splitlines()[:step] if path.is_file() else []
    try:
        records = [json.loads(line) for line in lines]
        logged = [record["step"] for record in records]
    except (json.JSONDecodeError, KeyError, TypeError):
        logged = []
    if logged != list(range(1, step + 1)):
        raise CheckpointError(f"{path} does not hold the checkpoint's {step} steps, so the resumed run's metrics "
                              "would not match it")
    write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    return records


def _non_finite_message(value: float, step: int, settings: SearchSettings, checkpoint_dir: Path | None,
                        checkpointed_step: int | None) -> str:
    """One line for a NaN/inf loss: where the last good checkpoint is and how to continue from it."""
    message = f"loss became {value} at step {step}; "
    if checkpoint_dir is None or checkpointed_step is None:
        return message + "lower --gate-lr or --multiplier-lr, or use --dtype float32"
    return message + (f"the last good checkpoint is step {checkpointed_step}; continue from it with a lower rate: "
                      f"consa search --resume {shlex.quote(str(checkpoint_dir))} --gate-lr {settings.gate_lr / 2:g}"
                      " (or a lower --multiplier-lr)")


def environment_versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    import platform

    import transformers

    from consa_cli import __version__

    return {"consa": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_run_dir(output: str | Path, force: bool) -> Path:
    """Refuse to mix a new run into an old one (unless ``force``) or to write into a file; creates nothing."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory; choose another --output")
    existing = next(parent for parent in output.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {output}: {existing} is not a writable directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise FileExistsError(f"{output} already holds a run; pass --force to overwrite it or choose --output")
    return output


def prepare_run_dir(output: str | Path, force: bool) -> Path:
    """:func:`check_run_dir`, then create the directory."""
    output = check_run_dir(output, force)
    output.mkdir(parents=True, exist_ok=True)
    return output


def search(settings: SearchSettings, force: bool = False, on_start: Callable[[dict], None] | None = None,
           on_step: Callable[[dict], None] | None = None, resume: CheckpointState | None = None,
           on_seed: Callable[[dict], None] | None = None, loaded: tuple | None = None) -> SearchResult:
    """``consa search`` end to end: load model and calibration data, learn, write the run directory.

    The run directory holds ``allocation.safetensors`` (the result), ``metrics.jsonl`` (one line per step),
    ``run.json`` (settings, summary, versions) and ``checkpoint.safetensors`` (the search state after the last
    checkpointed step). It is kept after a finished run, which ``resume`` can then extend to more steps.
    With ``resume`` (:func:`load_checkpoint` of ``settings.output``), the run continues in place.
    With ``settings.seeds`` > 1 it is :func:`search_seeds` (``on_seed`` hears of each seed). ``loaded``: the
    ``(model, tokenizer)`` of ``settings.model`` on the settings' device and dtype, already loaded (the seeds of
    one run share it: a search leaves the model's weights and attention as it found them).
    """
    from consa_cli.data import load_token_sequences
    from consa_cli.families import adapter_for
    from consa_cli.models import load_model_and_tokenizer, model_fingerprint

    settings.validate()
    if settings.seeds > 1:
        if resume is not None:
            raise SettingsError("--resume continues one search; to continue a run of several seeds, run its command "
                                "again (finished seeds are kept, an interrupted one resumes)")
        return search_seeds(settings, force=force, on_start=on_start, on_step=on_step, on_seed=on_seed)
    if resume is None:
        check_run_dir(settings.output, force)  # fail before minutes of loading; create it only once all loaded
    device = resolve_device(settings.device)
    if settings.cuda_graphs and device.type != "cuda":  # before the model and data are loaded
        raise SettingsError(f"--cuda-graphs needs a CUDA device, and this search runs on {device}")
    # Fail before loading.
    attention_backend = resolve_attention_backend(settings.attention_backend, device, getattr(torch, settings.dtype))
    model, tokenizer = loaded or load_model_and_tokenizer(settings.model, dtype=getattr(torch, settings.dtype),
                                                          device=str(device))
    if settings.granularity == "kv-head-per-layer":
        full_heads_per_layer(model.config.num_key_value_heads, settings.sparsity)
    sink_tokens = settings.sink_tokens
    if sink_tokens is None:
        sink_tokens = adapter_for(model.config.model_type).default_sink_tokens
    # All calibration sequences: the seeded order draws from the whole split, not just its first articles.
    sequences = load_token_sequences(settings.data, tokenizer, settings.seq_len, "calibration")
    drawn = []  # every retrieval sample the filter looked at (reported: what share the dense model answers)
    if settings.retrieval_filter == "answered":
        answered = answered_by(model)  # the dense model: no gates are installed yet

        def keep(ids, loss_mask):
            drawn.append(answered(ids, loss_mask))
            return drawn[-1]
    else:
        keep = None
    calibration = mix_retrieval(sequences, tokenizer, settings.retrieval_fraction, settings.window, settings.seed,
                                settings.retrieval_formats, settings.calibration_haystack, keep)
    if resume is None:
        output = prepare_run_dir(settings.output, force)
        # An overwritten run's checkpoint must not be left for a later --resume to continue.
        (output / CHECKPOINT_FILE).unlink(missing_ok=True)
    else:
        output = Path(settings.output)
        for name in (CHECKPOINT_FILE, METRICS_FILE, ALLOCATION_FILE, RUN_FILE):
            for leftover in output.glob(f".{name}.*.tmp"):  # write_atomically's temp files from a killed process
                leftover.unlink()
    if on_start is not None:
        on_start({"model": model.config.name_or_path, "sink_tokens": sink_tokens,
                  "attention_backend": attention_backend,
                  "cuda_graphs": settings.method != "attention-mass" and uses_cuda_graphs(settings, device,
                                                                                           attention_backend),
                  "calibration_sequences": calibration.sequences.shape[0],
                  "retrieval_sequences": calibration.retrieval_count, "retrieval_drawn": len(drawn) or None,
                  "device": str(device),
                  "units": UnitLayout(settings.granularity, model.config.num_hidden_layers,
                                      model.config.num_key_value_heads).num_units,
                  "native_sparsity": native_sparsity(model.config),
                  "resumed_from": resume.step if resume is not None else 0})
    if settings.method == "attention-mass":
        from consa_cli.heuristics import attention_mass_search

        result = attention_mass_search(settings, model, calibration, sink_tokens, model_fingerprint(model),
                                       on_step=on_step)
    else:
        result = run_search(settings, model, calibration, sink_tokens, model_fingerprint(model), on_step=on_step,
                            metrics_path=output / METRICS_FILE, checkpoint_dir=output, resume=resume)
    result.allocation.metadata["calibration_sequences"] = int(calibration.sequences.shape[0])
    result.allocation.metadata["retrieval_sequences"] = calibration.retrieval_count
    result.allocation.metadata["versions"] = environment_versions()
    result.allocation.save(output / ALLOCATION_FILE)
    summary = {
        "settings": settings_to_dict(settings),
        "sink_tokens": sink_tokens,
        "attention_backend": attention_backend,
        "allocation": result.allocation.settings_dict(),
        "fa_rows": result.allocation.render_rows(),
        "seconds": round(result.seconds, 2),  # of this call only, for a resumed run
        "seconds_per_step": round(result.seconds / max(1, settings.steps - result.first_step), 3),
        "versions": environment_versions(),
    }
    if "resumes" in result.allocation.metadata:
        summary["resumes"] = result.allocation.metadata["resumes"]
    write_atomically(output / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return result


SEED_RUN_PREFIX = "seed-"
# Settings that never change what a search computes.
IGNORED_ON_RESTART = ("checkpoint_every", "compile", "skip_closed_gates", "teacher_cache_gib", "cuda_graphs")
# What a run directory of several seeds holds besides the seeds' own run directories.
SEEDS_RUN_FILES = (ALLOCATION_FILE, RUN_FILE)


def seed_settings(settings: SearchSettings, seed: int) -> SearchSettings:
    """The settings of one seed's search in a run of several: a plain search in ``OUTPUT/seed-<seed>``."""
    return dataclasses.replace(settings, seed=seed, seeds=1,
                               output=str(Path(settings.output) / f"{SEED_RUN_PREFIX}{seed}"))


def search_seeds(settings: SearchSettings, force: bool = False, on_start: Callable[[dict], None] | None = None,
                 on_step: Callable[[dict], None] | None = None,
                 on_seed: Callable[[dict], None] | None = None) -> SearchResult:
    """``consa search --seeds N``: N searches, seeds ``seed .. seed+N-1``, and the vote over their allocations.

    Each seed's search is a plain :func:`search` (its own calibration retrieval mix, data order and gate noise,
    all drawn from its seed) with its own run directory ``OUTPUT/seed-<seed>``; ``OUTPUT/allocation.safetensors``
    is :func:`~consa_cli.vote.vote` over them at the same target, and ``OUTPUT/run.json`` summarises the run.
    Running it again keeps the seeds already finished with these settings and resumes an interrupted one from
    its checkpoint; ``force`` restarts them all. ``on_seed`` receives, before each seed, its position and what
    happens to it: ``new``, ``resume`` or ``finished`` (kept).
    """
    from consa_cli.vote import vote

    settings.validate()
    runs = [seed_settings(settings, settings.seed + offset) for offset in range(settings.seeds)]
    output = _check_seeds_dir(settings.output, force)
    plans = [_seed_plan(run, force) for run in runs]  # every seed checked before minutes of searching
    output.mkdir(parents=True, exist_ok=True)
    if force:  # an overwritten single-seed run's state must not be left for a later --resume to continue
        for name in (CHECKPOINT_FILE, METRICS_FILE):
            (output / name).unlink(missing_ok=True)
    allocations, seconds, loaded = [], 0.0, None
    for index, (run, (status, checkpoint)) in enumerate(zip(runs, plans, strict=True), start=1):
        if on_seed is not None:
            on_seed({"index": index, "count": len(runs), "seed": run.seed, "run_dir": run.output, "status": status,
                     "resumed_from": checkpoint.step if checkpoint is not None else 0})
        if status == "finished":
            allocations.append(Allocation.load(run.output))
            continue
        if loaded is None:  # once for all seeds (minutes for a large model), and only if a seed still searches
            from consa_cli.models import load_model_and_tokenizer

            loaded = load_model_and_tokenizer(run.model, dtype=getattr(torch, run.dtype),
                                              device=str(resolve_device(run.device)))
        # A new seed's directory holds nothing to continue (at most a killed run's first steps): overwrite it.
        result = search(run, force=status == "new", on_start=on_start, on_step=on_step, resume=checkpoint,
                        loaded=loaded)
        allocations.append(result.allocation)
        seconds += result.seconds
    seeds = [run.seed for run in runs]
    method = f"{allocations[0].method} vote of {len(runs)} seeds"
    voted = vote(allocations, settings.sparsity, method=method)
    voted.metadata.update({"settings": settings_to_dict(settings), "seeds": seeds,
                           "seed_runs": [Path(run.output).name for run in runs],
                           "versions": environment_versions()})
    voted.save(output / ALLOCATION_FILE)
    summary = {
        "settings": settings_to_dict(settings),
        "seeds": seeds,
        "seed_runs": [Path(run.output).name for run in runs],
        "allocation": voted.settings_dict(),
        "fa_rows": voted.render_rows(),
        "seconds": round(seconds, 2),  # of this call's searches only
        "versions": environment_versions(),
    }
    write_atomically(output / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return SearchResult(allocation=voted, seconds=seconds)


def _check_seeds_dir(output: str | Path, force: bool) -> Path:
    """:func:`check_run_dir` for a run of several seeds, which may already hold seed directories and a vote: running
    the command again continues it, with more seeds or fewer (a seed directory left out is not voted on)."""
    output = check_run_dir(output, force=True)
    if force or not output.is_dir():
        return output
    foreign = sorted(entry.name for entry in output.iterdir()
                     if not (entry.name in SEEDS_RUN_FILES or _is_temp_file_of(entry.name, SEEDS_RUN_FILES)
                             or (entry.is_dir() and re.fullmatch(f"{SEED_RUN_PREFIX}-?[0-9]+", entry.name))))
    if foreign:
        raise FileExistsError(f"{output} already holds another run ({foreign[0]}); pass --force to overwrite it or "
                              "choose --output")
    for name in SEEDS_RUN_FILES:
        for leftover in output.glob(f".{name}.*.tmp"):  # write_atomically's temp files from a killed process
            leftover.unlink()
    return output


def _is_temp_file_of(name: str, files: tuple[str, ...]) -> bool:
    return any(name.startswith(f".{file}.") and name.endswith(".tmp") for file in files)


def _seed_plan(run: SearchSettings, force: bool) -> tuple[str, CheckpointState | None]:
    """What one seed's search needs: ``new`` (start it), ``resume`` (from the returned checkpoint) or
    ``finished`` (its allocation is there, searched with these settings); another run in its place is an error."""
    from consa_cli.checkpoint import load_checkpoint

    run_dir = Path(run.output)
    if force or not run_dir.is_dir():
        return "new", None
    finished = (run_dir / ALLOCATION_FILE).is_file()
    if finished:
        differs = _settings_differ(Allocation.load(run_dir).metadata.get("settings", {}), run)
        if differs is None:
            return "finished", None
    if (run_dir / CHECKPOINT_FILE).is_file():
        checkpoint = load_checkpoint(run_dir)
        differs = _settings_differ(checkpoint.settings, run)
        if differs is None:
            return "resume", checkpoint
    elif not finished:
        return "new", None
    raise FileExistsError(f"{run_dir} holds a search with other settings ({differs}); pass --force to restart every "
                          "seed or choose another --output")


def _settings_differ(saved: dict, run: SearchSettings) -> str | None:
    """The first setting in which a saved run's ``saved`` settings differ from ``run``'s, as '--name: a, b'; None
    when they would compute the same search (the directory it was written to aside)."""
    from consa_cli.settings import with_legacy_retrieval_loss

    saved = with_legacy_retrieval_loss({("attention_backend" if key == "backend" else key): value
                                        for key, value in saved.items()})
    current = settings_to_dict(run)
    for name, value in current.items():
        if name in ("output", *IGNORED_ON_RESTART):
            continue
        if saved.get(name, getattr(SearchSettings, name, None)) != value:
            return f"--{name.replace('_', '-')}: run {saved.get(name)}, given {value}"
    return None
