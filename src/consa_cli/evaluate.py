"""``consa eval``: held-out perplexity of hybrid models side by side with the dense original.

Targets can be export directories, allocation files / run directories (applied in memory to their model), or
plain models. Every target is scored on the same evaluation sequences, so differences are paired: for each
target we report the mean per-sequence NLL difference against the dense model and its paired t statistic.

Perplexity over a whole sequence averages the long-range cost of sliding-window units away: a query at position
``q < W`` sees its whole prefix through a window of ``W`` keys, so its prediction is exactly the dense one. The
same NLL is therefore also split by query position into buckets ``[0, W), [W, 2W), [2W, 4W), ...`` (W the
allocation's window), each with its own paired difference against the dense model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from consa_cli.allocation import ALLOCATION_FILE, Allocation, write_atomically
from consa_cli.attention import hybrid_attention
from consa_cli.baselines import native_allocation
from consa_cli.data import EMBEDDED_CORPUS, load_token_sequences
from consa_cli.downstream import load_tasks, run_tasks
from consa_cli.export import MASK_FILE, load_hybrid, read_export_config
from consa_cli.models import ModelError, load_model_and_tokenizer, model_fingerprint
from consa_cli.retrieval import DEFAULT_HAYSTACK, evaluate_retrieval, haystack_filler

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class EvalSettings:
    """What ``consa eval`` measures. 32 x 1024 held-out tokens give paired t statistics that separate
    allocations on the embedded model in about a minute per target on 2 cores."""

    data: str = EMBEDDED_CORPUS
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    max_sequences: int = 32
    batch_size: int = 1
    dtype: str = "bfloat16"
    device: str = "cpu"
    include_dense: bool = True
    dense_model: str | None = None
    # Position buckets' base width; None: the targets' sliding window (the most common one for dense rows).
    bucket_window: int | None = None
    # Long-context retrieval (consa_cli.retrieval); no tasks = perplexity only.
    retrieval_tasks: list[str] = field(default_factory=list)
    retrieval_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    retrieval_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    retrieval_samples: int = 4
    retrieval_seed: int = 0
    retrieval_haystack: str = DEFAULT_HAYSTACK  # see consa_cli.retrieval.HAYSTACKS
    # Downstream benchmarks through lm-evaluation-harness (consa_cli.downstream); no tasks = none.
    tasks: list[str] = field(default_factory=list)
    tasks_include: str | None = None  # a directory of lm-eval task YAML files (local data works offline)
    tasks_limit: int | None = None  # documents per task, for quick checks
    tasks_fewshot: int | None = None  # None: each task's own default


@dataclass
class Target:
    """One thing to evaluate: a label, how to obtain it, and the allocation it runs (None = dense)."""

    label: str
    kind: str  # "export", "allocation" or "model"
    path: str
    allocation: Allocation | None = None
    base_model: str | None = None
    # Weights it was made from, when they are not its own (a healed export): paired with dense when they are dense's.
    source_fingerprint: str | None = None


def resolve_target(spec: str) -> Target:
    """Classify a command-line target: export dir, allocation file / run dir, or model name."""
    path = Path(spec)
    if path.is_dir() and (path / MASK_FILE).is_file():
        section = read_export_config(path)
        healed = section.get("healed") or {}
        return Target(path.name, "export", spec, Allocation.load(path / MASK_FILE),
                      base_model=section.get("source_model") or None,
                      source_fingerprint=healed.get("source_fingerprint"))
    if (path.is_dir() and (path / ALLOCATION_FILE).is_file()) or (path.is_file() and path.suffix == ".safetensors"):
        allocation = Allocation.load(path)
        healed = allocation.metadata.get("healed")  # weights healed from others, as `consa heal` records them
        return Target(path.stem if path.is_file() else path.name, "allocation", spec, allocation,
                      base_model=allocation.model or None,
                      source_fingerprint=healed.get("source_fingerprint") if isinstance(healed, dict) else None)
    return Target(spec, "model", spec, None, base_model=spec)


def resolve_targets(specs: list[str], model: str | None = None) -> list[Target]:
    """:func:`resolve_target` for each spec, with labels made unique: targets whose names collide (``a/seed-0`` and
    ``b/seed-0``) are labelled with as many parent folders as it takes, and a target given twice gets ``(2)``.
    Results are keyed by label (tables, the report, the JSON), so a collision would merge two rows.

    ``model``: apply allocation files and run dirs to this model instead of the one recorded in them (an
    allocation made on another machine names that machine's path); their model fingerprint is still checked, so
    an allocation cannot be applied to a model it was not made for. Exports carry their own weights and keep them."""
    targets = [resolve_target(spec) for spec in specs]
    if model:
        for target in targets:
            if target.kind == "allocation":
                target.base_model = model
    where = [Path(target.path).resolve() if target.kind != "model" else target.path for target in targets]
    firsts = [target for index, target in enumerate(targets) if where[index] not in where[:index]]
    for components in range(2, 16):
        counts = Counter(target.label for target in firsts)
        colliding = [target for target in firsts if counts[target.label] > 1 and target.kind != "model"]
        if not colliding:
            break
        for target in colliding:
            path = Path(target.path).resolve()
            parents = path.parent.parts[1:][-(components - 1):]
            target.label = "/".join([*parents, path.stem if path.is_file() else path.name])
    seen: Counter = Counter()
    for index, target in enumerate(targets):  # the same target given more than once
        if where[index] in where[:index]:
            first = targets[where.index(where[index])]
            seen[first.label] += 1
            target.label = f"{first.label} ({seen[first.label] + 1})"
    return targets


def token_nll(model, sequences: torch.Tensor, batch_size: int = 1,
              on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Next-token NLL ``[N, T - 1]`` (float64) of every sequence; entry ``q`` is the prediction made at query
    position ``q`` (of token ``q + 1``), computed in float32 from the logits."""
    device = next(model.parameters()).device
    results = []
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            results.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").double().cpu())
            if on_batch is not None:
                on_batch(batch.shape[0])
    return torch.cat(results)


def sequence_nll(model, sequences: torch.Tensor, batch_size: int = 1,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Mean next-token NLL of each sequence ``[N]`` (float64), computed in float32 from the logits."""
    return token_nll(model, sequences, batch_size, on_batch).mean(dim=1)


def position_buckets(window: int, positions: int) -> list[tuple[int, int]]:
    """Query-position ranges ``[0, W), [W, 2W), [2W, 4W), ...`` covering ``range(positions)``, the last cut
    at ``positions``. The first is where a sliding window of ``W`` keys still sees the whole prefix."""
    if window < 1 or positions < 1:
        raise ValueError(f"buckets need window >= 1 and positions >= 1, got {window} and {positions}")
    edges = [0, window]
    while edges[-1] < positions:
        edges.append(edges[-1] * 2)
    edges = [edge for edge in edges if edge < positions] + [positions]
    return list(zip(edges[:-1], edges[1:], strict=True))


def bucket_rows(nll: torch.Tensor, buckets: list[tuple[int, int]],
                reference: torch.Tensor | None = None) -> list[dict]:
    """Mean NLL / PPL of the per-token ``nll [N, P]`` in each bucket of query positions, with the paired
    per-sequence difference against ``reference [N, P]`` (the dense model's) when given."""
    rows = []
    for start, end in buckets:
        per_sequence = nll[:, start:end].mean(dim=1)
        mean = per_sequence.mean().item()
        row = {"start": start, "end": end, "nll": mean, "ppl": math.exp(mean)}
        if reference is not None:
            row["delta_nll_vs_dense"], row["paired_t_vs_dense"] = paired_difference(
                per_sequence, reference[:, start:end].mean(dim=1))
        rows.append(row)
    return rows


def paired_difference(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean per-sequence NLL difference and its paired t statistic (nan with fewer than 2 sequences)."""
    delta = candidate - reference
    mean = delta.mean().item()
    if delta.numel() < 2:
        return mean, math.nan
    std = delta.std(unbiased=True).item()
    if std == 0:  # every sequence differs by the same amount: +-inf, or 0 when the scores are identical
        return mean, math.copysign(math.inf, mean) if mean != 0 else 0.0
    return mean, mean / (std / math.sqrt(delta.numel()))


def evaluate(targets: list[Target], settings: EvalSettings,
             on_progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Perplexity of every target (and the dense original first) at every ``seq_len``; one row per pair."""
    dtype = DTYPES[settings.dtype]
    rows: list[dict] = []
    dense_name = settings.dense_model or next((t.base_model for t in targets if t.base_model), None)
    # Models named only by an allocation's record (not on the command line), for a hint when one cannot be loaded.
    recorded_in = {t.base_model: t.path for t in reversed(targets) if t.kind == "allocation" and t.base_model
                   and t.allocation is not None and t.base_model == t.allocation.model
                   and t.base_model != settings.dense_model}
    listed = next((t for t in targets if t.kind == "model" and t.path == dense_name), None)
    if listed is not None:  # the reference is scored first, so every other target gets its delta
        targets = [listed, *(t for t in targets if t is not listed)]
    elif settings.include_dense and dense_name is not None:
        targets = [Target(f"dense ({dense_name})", "model", dense_name, None, base_model=dense_name), *targets]
    loaded: dict[str, tuple] = {}
    sequences: dict[tuple, torch.Tensor] = {}
    dense_nll: dict[int, torch.Tensor] = {}  # per token, [N, seq_len - 1]
    dense_fingerprint = None
    harness_tasks = load_tasks(settings.tasks, settings.tasks_include) if settings.tasks else None
    windows = [t.allocation.sliding_window for t in targets if t.allocation is not None]
    reference_window = settings.bucket_window or (Counter(windows).most_common(1)[0][0] if windows else None)

    for target in targets:
        applied = target.allocation if target.kind == "allocation" else None  # an export has it built in
        if target.kind == "export":
            model, tokenizer = load_hybrid(target.path, dtype=dtype, device=settings.device, return_tokenizer=True)
        else:
            key = target.base_model or ""
            if key not in loaded:
                loaded.clear()  # keep one base model in memory at a time
                try:
                    loaded[key] = load_model_and_tokenizer(target.base_model, dtype=dtype, device=settings.device)
                except ModelError as error:
                    if key not in recorded_in:  # a name the user gave
                        raise
                    raise ModelError(f"{error} (the model recorded in {recorded_in[key]}; pass --model to apply "
                                     "the allocation to a copy of it elsewhere)") from None
            model, tokenizer = loaded[key]
            if target.allocation is not None:
                target.allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads,
                                             model_fingerprint(model))
        for seq_len in settings.seq_lens:
            token_key = (tokenizer.name_or_path, len(tokenizer), seq_len)
            if token_key not in sequences:
                sequences[token_key] = load_token_sequences(settings.data, tokenizer, seq_len, "evaluation",
                                                            settings.max_sequences)
            batch = sequences[token_key]
            progress = (lambda n, label=target.label, total=batch.shape[0]: on_progress(label, n, total)) \
                if on_progress else None
            with _runtime(model, applied):
                per_token = token_nll(model, batch, settings.batch_size, progress)
            nll = per_token.mean(dim=1)
            row = _row(target, seq_len, nll)
            if target.kind == "model" and target.allocation is None:
                _describe_own_pattern(row, model.config)
            fingerprint = model_fingerprint(model)
            reference = None
            if target.kind == "model" and target.allocation is None and seq_len not in dense_nll:
                dense_nll[seq_len], dense_fingerprint = per_token, fingerprint
                row["is_reference"] = True
            elif seq_len in dense_nll and dense_fingerprint in (fingerprint, target.source_fingerprint):
                # Paired with dense only on its weights, or on weights healed from them (the same sequences).
                reference = dense_nll[seq_len]
                row["delta_nll_vs_dense"], row["paired_t_vs_dense"] = paired_difference(nll, reference.mean(dim=1))
            window = settings.bucket_window or (target.allocation.sliding_window if target.allocation
                                                else reference_window)
            if window is not None:
                row["bucket_window"] = window
                row["position_buckets"] = bucket_rows(per_token, position_buckets(window, seq_len - 1), reference)
                if window < seq_len - 1:  # every prediction whose query lies beyond the window, in one number
                    row["beyond_window"] = bucket_rows(per_token, [(window, seq_len - 1)], reference)[0]
            rows.append(row)
        target_rows = rows[-len(settings.seq_lens):]
        if settings.retrieval_tasks:
            with _runtime(model, applied):  # the same seeded prompts for every target that shares the tokenizer
                retrieval = evaluate_retrieval(model, tokenizer, settings.retrieval_tasks, settings.retrieval_lengths,
                                               settings.retrieval_depths, settings.retrieval_samples,
                                               settings.retrieval_seed, haystack_filler(settings.retrieval_haystack),
                                               batch_size=settings.batch_size)
            for row in target_rows:
                row["retrieval"] = retrieval
        if harness_tasks is not None:
            with _runtime(model, applied):
                scores = run_tasks(model, tokenizer, harness_tasks, settings.batch_size, settings.tasks_limit,
                                   settings.tasks_fewshot)
            for row in target_rows:
                row["tasks"] = scores
        if target.kind == "export":
            del model
    return rows


def _runtime(model, allocation: Allocation | None):
    """The model as this target runs it: with the allocation applied in memory, or as it is."""
    if allocation is None:
        return nullcontext()
    return hybrid_attention(model, allocation.fa_mask.to(model.device), allocation.sliding_window,
                            allocation.sink_tokens)


def write_eval_json(path: str | Path, settings: EvalSettings, rows: list[dict]) -> Path:
    """Write ``{"settings", "rows"}`` as strict JSON (a non-finite t statistic becomes null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = _finite({"settings": asdict(settings), "rows": rows})
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
    return path


def _finite(value):
    """``value`` with every inf / nan float (at any depth) replaced by None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _describe_own_pattern(row: dict, config) -> None:
    """A model trained with sliding layers (Gemma3's 5:1) is its own hybrid, not all-full attention: the row says
    what the reference really runs (its full / sliding layers and window) and is labelled ``original``."""
    layer_types = getattr(config, "layer_types", None) or []
    if not getattr(config, "sliding_window", None) or "sliding_attention" not in layer_types:
        return
    native = native_allocation(config)
    row.update(granularity="layer", full_units=native.num_full_units, units=native.num_units,
               sparsity=native.sparsity, sliding_window=native.sliding_window, sink_tokens=0, native_pattern=True)
    if row["label"].startswith("dense ("):
        row["label"] = "original" + row["label"][len("dense"):]


def _row(target: Target, seq_len: int, nll: torch.Tensor) -> dict:
    allocation = target.allocation
    return {
        "label": target.label,
        "kind": target.kind,
        "path": target.path,
        "method": allocation.method if allocation else "dense",
        "granularity": allocation.granularity if allocation else None,
        "full_units": allocation.num_full_units if allocation else None,
        "units": allocation.num_units if allocation else None,
        "sparsity": allocation.sparsity if allocation else 0.0,
        "sliding_window": allocation.sliding_window if allocation else None,
        "sink_tokens": allocation.sink_tokens if allocation else None,
        "seq_len": seq_len,
        "sequences": nll.numel(),
        "nll": nll.mean().item(),
        "ppl": math.exp(nll.mean().item()),
        "nll_per_sequence": [round(value, 6) for value in nll.tolist()],
    }
