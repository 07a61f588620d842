"""``consa heal``: the weights of a fixed allocation trained to reproduce the dense model they came from.

A searched allocation picks which units keep full attention; the weights were trained for all-full attention, so
the sliding units see less than they expect. Healing distils the dense model into the hybrid: the dense model (a
frozen copy) is the teacher, the hybrid (the allocation installed as a hard mask) the student, and the loss is
KL(dense || hybrid) on every token of held-out-split calibration text, as the search's KL loss. Only the chosen
weights train (``HealSettings.train``); the allocation never changes. The result is an export directory (the
format of ``consa export``), so ``consa eval`` and :func:`consa_cli.export.load_hybrid` take it as they take any
export, and its ``consa`` section says how it was healed and from which weights (``healed``).

On SmolLM2-135M at sparsity 0.75 (docs/results.md 1g.17) healing on Wikipedia alone took passkey + multikey
retrieval -- formats it never saw -- from 76% to 94.5% of dense; healed rule allocations stayed at 15-17%: healing
repairs what the allocation kept in reach, it does not replace the search.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from consa_cli.allocation import Allocation
from consa_cli.attention import attention_modules, install_hybrid, remove_hybrid
from consa_cli.calibration import CalibrationSet, mix_retrieval
from consa_cli.losses import kl_to_teacher
from consa_cli.settings import HealSettings, SettingsError, settings_to_dict

HEAL_LOG_FILE = "heal_log.json"


@dataclass
class HealResult:
    """What :func:`heal` wrote and how the KL went."""

    path: Path
    allocation: Allocation  # as recorded in the export: fitted to the healed weights
    loader: str
    log: list[dict] = field(default_factory=list)  # one entry per step
    seconds: float = 0.0


def trainable_parameters(model: nn.Module, allocation: Allocation, which: str) -> list[nn.Parameter]:
    """The parameters ``which`` (``HealSettings.train``) names: ``attention`` -- every attention module's;
    ``sliding`` -- those of layers with at least one sliding unit; ``all`` -- every one but the input embeddings
    (tied output heads share them, so they stay too)."""
    if which == "all":
        embedding = model.get_input_embeddings().weight
        return [param for param in model.parameters() if param is not embedding]
    modules = attention_modules(model)
    if which == "attention":
        layers = range(len(modules))
    elif which == "sliding":
        layers = [index for index in range(len(modules)) if not bool(allocation.fa_mask[index].all())]
    else:
        raise SettingsError(f"--train must be attention, sliding or all, got '{which}'")
    return [param for index in layers for param in modules[index].parameters()]


def learning_rate(step: int, settings: HealSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``steps``."""
    warmup = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    return settings.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))


# The attention backends whose graphed healing step a CUDA test checks against the eager one (tests/test_heal.py).
# Only sdpa is graphed by default: it is the one measured (bench/device/heal_step_probe.py, docs/benchmarks.md).
CUDA_GRAPH_BACKENDS = ("sdpa",)


def uses_cuda_graphs(settings: HealSettings, device: torch.device, attention_backend: str) -> bool:
    """Whether the healing replays CUDA graphs: ``--cuda-graphs`` as given, or by default (None) on CUDA with the
    sdpa backend. On an H200 (SmolLM2-135M's shape, 1024 tokens, float32; session 22) the eager step took 232 ms
    -- ~8,600 kernel launches behind Python for ~125 ms of device work -- and the graphed step 63 ms, the KL the same
    to 1e-5 (relative) over 40 steps."""
    if settings.cuda_graphs is not None:
        return settings.cuda_graphs
    return device.type == "cuda" and attention_backend in CUDA_GRAPH_BACKENDS


class StudentLogits(nn.Module):
    """The student's logits as a function of the token ids: what the healing's CUDA graphs capture (forward and
    backward, with respect to the trained weights)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def graphed_student(model: nn.Module, sample_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The student's forward and backward captured on ``sample_ids``'s shape (torch.cuda.make_graphed_callables):
    the trained weights are read and their gradients written in place, so AdamW's eager updates between replays are
    what the next replay computes with."""
    return torch.cuda.make_graphed_callables(StudentLogits(model), (sample_ids,))


def graphed_teacher(teacher: nn.Module, sample_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's no-grad forward captured as one CUDA graph: a callable that copies its ids into the graph's
    static input, replays it and returns the static logits (overwritten by the next call: each step's loss and
    backward are done with them before the next step calls again)."""
    static_ids = sample_ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up off the capture stream, as torch.cuda.graphs asks
            teacher(input_ids=static_ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_logits = teacher(input_ids=static_ids, use_cache=False).logits

    def replay(ids: torch.Tensor) -> torch.Tensor:
        static_ids.copy_(ids)
        graph.replay()
        return static_logits

    return replay


def heal_weights(model: nn.Module, teacher: nn.Module, allocation: Allocation, calibration: CalibrationSet,
                 settings: HealSettings, attention_backend: str = "sdpa",
                 on_step: Callable[[dict], None] | None = None, cuda_graphs: bool = False) -> list[dict]:
    """Train ``model``'s ``settings.train`` weights in place under ``allocation`` (a hard mask) to match ``teacher``.

    Each step reads ``settings.batch_size`` rows of ``calibration`` in a seeded order (wrapping around when the
    steps ask for more rows than there are), so a run of fewer steps than rows sees every row at most once and the
    logged KL is measured on rows the weights have not been trained on yet. The model leaves with its original
    attention and ``requires_grad`` off everywhere; returns one ``{"step", "kl", "lr", "retrieval", "seconds"}`` per
    step. Nothing here is global: the data order and the optimiser live in this call.

    ``cuda_graphs`` (a CUDA model): the student's forward and backward and the teacher's forward are captured once
    on the first batch's shape and replayed every step; the loss, the clipping and AdamW stay eager, so the steps
    compute what the eager ones do.
    """
    from consa_cli.search import step_batch

    device = next(model.parameters()).device
    order, params, optimizer = start_training(model, allocation, calibration, settings, attention_backend)
    log: list[dict] = []
    try:
        if cuda_graphs:
            if device.type != "cuda":
                raise SettingsError(f"--cuda-graphs needs a CUDA device, and this healing runs on {device}")
            first = calibration.sequences[step_batch(order, 0, settings.batch_size)].to(device)
            student, teacher_logits_of = graphed_student(model, first), graphed_teacher(teacher, first)
        else:
            def student(ids: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids, use_cache=False).logits

            def teacher_logits_of(ids: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return teacher(input_ids=ids, use_cache=False).logits
        started = time.perf_counter()  # the capture (a few eager steps' time) is not a step's
        for step in range(settings.steps):
            rate = learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = rate
            rows = step_batch(order, step, settings.batch_size)
            ids = calibration.sequences[rows].to(device)
            teacher_logits = teacher_logits_of(ids)
            weights = answer_token_weights(calibration, rows, settings.answer_weight)
            loss = kl_to_teacher(student(ids), teacher_logits, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            kl = loss.item()
            if not math.isfinite(kl):
                raise FloatingPointError(f"the healing KL became {kl} at step {step}; lower --lr")
            log.append({"step": step, "kl": round(kl, 6), "lr": rate,
                        "retrieval": int(calibration.is_retrieval[rows].sum()),
                        "seconds": round(time.perf_counter() - started, 3)})
            if on_step is not None:
                on_step(log[-1])
    finally:
        end_training(model)
    return log


def answer_token_weights(calibration: CalibrationSet, rows: torch.Tensor, answer_weight: float) -> torch.Tensor | None:
    """Per-token weights of a healing batch's KL (flattened ``[rows x seq_len]``), or None for the plain mean.

    Each sequence's loss is its mean KL over every token; a retrieval sample's adds ``answer_weight`` x its mean KL
    over its answer tokens (``loss_mask``); the batch's is the mean over its sequences. None -- the plain mean over
    tokens, the same number -- when ``answer_weight`` is 0 or the batch holds no retrieval sample."""
    answers = calibration.loss_mask[rows] & calibration.is_retrieval[rows, None]
    if answer_weight == 0 or not answers.any():
        return None
    count, length = answers.shape
    weights = torch.full(answers.shape, 1.0 / length)
    weights += answers * (answer_weight / answers.sum(1, keepdim=True).clamp(min=1))
    return (weights / count).flatten()


def start_training(model: nn.Module, allocation: Allocation, calibration: CalibrationSet, settings: HealSettings,
                   attention_backend: str) -> tuple[torch.Tensor, list[nn.Parameter], torch.optim.Optimizer]:
    """Set ``model`` up for healing: the seeded data order, only ``settings.train``'s weights trainable, AdamW on
    them, the allocation installed as a hard mask, training mode. Undone by :func:`end_training`."""
    device = next(model.parameters()).device
    order = torch.randperm(calibration.sequences.shape[0], generator=torch.Generator().manual_seed(settings.seed))
    for param in model.parameters():
        param.requires_grad_(False)
    params = trainable_parameters(model, allocation, settings.train)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    install_hybrid(model, allocation.fa_mask.to(device), allocation.sliding_window, allocation.sink_tokens,
                   attention_backend, padding_masks=False)
    model.train()
    return order, params, optimizer


def end_training(model: nn.Module) -> None:
    """The model back with its original attention, in eval mode, ``requires_grad`` off everywhere."""
    remove_hybrid(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def heal(allocation_path: str | Path, settings: HealSettings, force: bool = False,
         on_start: Callable[[dict], None] | None = None,
         on_step: Callable[[dict], None] | None = None) -> HealResult:
    """``consa heal`` end to end: load the allocation's model and the calibration split, heal, write the export.

    Training runs in float32 (AdamW's small updates would be lost to bfloat16 rounding); the export is written in
    the checkpoint's own dtype, with :data:`HEAL_LOG_FILE` (settings and the per-step KL) beside the weights. The
    output directory is only replaced with ``force``, and only once the new one is complete.
    """
    import json

    from consa_cli.data import load_token_sequences
    from consa_cli.export import ExportError, write_checkpoint
    from consa_cli.models import load_model_and_tokenizer, model_fingerprint
    from consa_cli.search import environment_versions, resolve_attention_backend, resolve_device

    settings.validate()
    output = Path(settings.output)
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    allocation = Allocation.load(allocation_path)
    device = resolve_device(settings.device)
    # auto is sdpa here, not the search's flex: on an H200 the default healing took 130 s with sdpa against 180 s
    # with flex (50 s of it compiling flex's float32 kernels), the same KL every step (docs/results.md 1g.17).
    requested = "sdpa" if settings.attention_backend == "auto" else settings.attention_backend
    attention_backend = resolve_attention_backend(requested, device, torch.float32)
    if settings.cuda_graphs and device.type != "cuda":  # before the model and data are loaded
        raise SettingsError(f"--cuda-graphs needs a CUDA device, and this healing runs on {device}")
    cuda_graphs = uses_cuda_graphs(settings, device, attention_backend)
    name = settings.model or allocation.model or None
    model, tokenizer = load_model_and_tokenizer(name, dtype=None, device="cpu")
    checkpoint_dtype = next(model.parameters()).dtype
    source_fingerprint = model_fingerprint(model)
    allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads, source_fingerprint)
    if allocation.sliding_window >= settings.seq_len:
        raise SettingsError(f"--seq-len ({settings.seq_len}) must be longer than the allocation's window "
                            f"({allocation.sliding_window}), or the hybrid is the dense model and there is nothing "
                            "to heal")
    model = model.to(device=device, dtype=torch.float32)
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    sequences = load_token_sequences(settings.data, tokenizer, settings.seq_len, "calibration")
    calibration = mix_retrieval(sequences, tokenizer, settings.retrieval_fraction, allocation.sliding_window,
                                settings.seed, settings.retrieval_formats, max_needles=settings.max_needles)
    if on_start is not None:
        on_start({"model": model.config.name_or_path, "device": str(device), "attention_backend": attention_backend,
                  "cuda_graphs": cuda_graphs,
                  "calibration_sequences": calibration.sequences.shape[0],
                  "retrieval_sequences": calibration.retrieval_count,
                  "trained_parameters": sum(p.numel() for p in trainable_parameters(model, allocation,
                                                                                      settings.train))})
    started = time.perf_counter()
    log = heal_weights(model, teacher, allocation, calibration, settings, attention_backend, on_step, cuda_graphs)
    seconds = time.perf_counter() - started
    del teacher
    model = model.to(device="cpu", dtype=checkpoint_dtype)
    record = {"settings": {**settings_to_dict(settings), "model": name}, "source_fingerprint": source_fingerprint,
              "attention_backend": attention_backend, "cuda_graphs": cuda_graphs, "device": str(device),
              "seconds": round(seconds, 2),
              "calibration_sequences": int(calibration.sequences.shape[0]),
              "retrieval_sequences": calibration.retrieval_count, "versions": environment_versions()}
    healed = replace(allocation, method=f"{allocation.method}+healed", model_fingerprint=model_fingerprint(model),
                     metadata={**allocation.metadata, "healed": record})
    written = write_checkpoint(model, tokenizer, healed, output, extra_section={"healed": record},
                               after_write=lambda staging: (staging / HEAL_LOG_FILE).write_text(
                                   json.dumps({**record, "steps": log}, indent=1) + "\n"))
    return HealResult(written.path, healed, written.loader, log, seconds)


__all__ = ["CUDA_GRAPH_BACKENDS", "HEAL_LOG_FILE", "HealResult", "end_training", "graphed_student", "graphed_teacher",
           "heal", "heal_weights", "learning_rate", "start_training", "trainable_parameters", "uses_cuda_graphs"]
