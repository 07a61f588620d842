"""Settings for each pipeline stage: dataclasses, the single source of defaults.

A recipe (``recipes/*.yaml``) is these dataclasses written down; command-line flags override recipe values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from consa_cli.allocation import GRANULARITIES
from consa_cli.calibration import (
    CALIBRATION_HAYSTACKS,
    DEFAULT_CALIBRATION_FORMATS,
    DEFAULT_CALIBRATION_HAYSTACK,
    MAX_NEEDLES,
    RETRIEVAL_FILTERS,
    check_max_needles,
    parse_formats,
)
from consa_cli.data import EMBEDDED_CORPUS, DataError

LOSSES = ("kl", "lm")
# l0: hard-concrete gates + augmented Lagrangian (ConSA); scalar-l1: sigmoid gates + L1, ranked (the paper's
# ablation); attention-mass: training-free, rank units by attention mass beyond the window on calibration text.
METHODS = ("l0", "scalar-l1", "attention-mass")
DTYPES = ("bfloat16", "float32", "float16")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flex", "flash", "fa4")  # auto: flex on a CUDA device that has it, else sdpa


def fraction(text: str) -> float:
    """A sparsity as typed: a decimal (``0.75``) or a ratio (``5/6``, Gemma3's own 5 sliding layers in 6)."""
    numerator, slash, denominator = str(text).strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number like 0.75 or a ratio like 5/6, got '{text}'") from None
    return value


class SettingsError(ValueError):
    """A setting or recipe is invalid."""


def check_retrieval_mix(retrieval_fraction: float, retrieval_formats: str) -> None:
    """The synthetic-retrieval share and formats of a calibration set (search and heal read them alike)."""
    if not 0.0 <= retrieval_fraction < 1.0:
        raise SettingsError(f"--retrieval-fraction must lie in [0, 1), got {retrieval_fraction}")
    try:
        parse_formats(retrieval_formats)
    except DataError as error:
        raise SettingsError(f"--retrieval-formats: {error}") from None


@dataclass
class SearchSettings:
    """Everything ``consa search`` needs. Defaults suit the embedded SmolLM2-135M on a 2-core CPU.

    Window 128 with 1024-token sequences is where allocation differences are measurable on that model
    (seq_len >= 8 x window); larger models on GPUs want the qwen3 recipes. The optimiser settings come from
    the tuning runs in docs/results.md: gate_lr 0.3 reaches the target within ~30 steps from log_alpha +5,
    and penalty_init 20 damps the overshoot so E[s] stays within 0.01 of the target from ~80 steps (with phi starting
    at 0 it was still 0.05-0.24 above the target after 150 steps and oscillated over 600).
    ``checkpoint_every`` only decides how much work an interruption can cost; it never changes the result.
    """

    model: str | None = None
    sparsity: float = 0.75
    granularity: str = "kv-head"
    window: int = 128
    sink_tokens: int | None = None  # None: the model family's default (4 for Llama/Qwen, 0 for Gemma3)
    seq_len: int = 1024
    data: str = EMBEDDED_CORPUS
    steps: int = 150
    batch_size: int = 1
    loss: str = "kl"  # on natural-text calibration sequences
    # On the synthetic retrieval sequences (only with retrieval_fraction > 0). lm: on SmolLM2-135M at sparsity 0.75
    # it lifted retrieval from 0.24 (kl) to 0.53 at the same perplexity (README, "Calibration for retrieval").
    retrieval_loss: str = "lm"
    method: str = "l0"
    l1_weight: float = 0.1  # scalar-l1 only: weight of the mean gate value in the loss
    retrieval_fraction: float = 0.0  # share of calibration sequences that are synthetic retrieval samples
    retrieval_formats: str = DEFAULT_CALIBRATION_FORMATS  # their formats, taken in turn (consa_cli.calibration)
    calibration_haystack: str = DEFAULT_CALIBRATION_HAYSTACK  # what their needles lie in: text, or a repeated filler
    # answered: only samples the dense model answers (greedy reproduces the answer), drawn until there are enough
    retrieval_filter: str = "none"
    seed: int = 0
    # Searches with seeds seed .. seed+seeds-1, the allocation their vote (consa_cli.vote): on SmolLM2-135M the vote
    # of four seeds kept more retrieval (0.635) than any one of them (0.27-0.54) at the same perplexity.
    seeds: int = 1
    gate_lr: float = 0.3
    multiplier_lr: float = 0.05
    target_warmup_steps: int = 30
    penalty_init: float = 20.0  # starting value of phi, the quadratic multiplier; > 0 damps E[s] oscillation
    log_alpha_init: float = 5.0
    temperature: float = 2.0 / 3.0
    stretch_low: float = -0.1
    stretch_high: float = 1.1
    dtype: str = "bfloat16"
    device: str = "auto"
    attention_backend: str = "auto"
    # The forward (gated student and KL teacher) through torch.compile: fused norms, rotary and MLP besides the
    # attention kernels. Same computation, so a run may be resumed with it switched.
    compile: bool = False
    # The full-attention branch only for the heads whose gate sample is not exactly 0 this step (l0 only): the same
    # losses and gradients, less work as gates close. Read on the host once per step. None: on where it was measured
    # to pay (consa_cli.search.skips_closed_gates: CUDA, long sequences, not compiled).
    skip_closed_gates: bool | None = None
    # The gated model's forward and backward captured once as CUDA graphs and replayed every step (CUDA only): the
    # host launches one graph instead of every layer's kernels. The same losses and gradients (the loss and the gate
    # updates stay eager); not with --compile or --skip-closed-gates (a graph runs one fixed set of kernels). None:
    # on for CUDA searches with the flex or sdpa backend unless one of those is asked for (search.uses_cuda_graphs).
    cuda_graphs: bool | None = None
    # The KL teacher's last hidden state of each calibration sequence the search will visit again, kept on the
    # search's device up to this many GiB (consa_cli.teacher): a revisit costs the output head, not a forward. Same
    # numbers either way; 0 recomputes every visit.
    teacher_cache_gib: float = 4.0
    output: str = "runs/search"
    checkpoint_every: int = 25  # steps between checkpoints; 0: only when interrupted and at the end

    def validate(self) -> None:
        if not 0.0 <= self.sparsity <= 1.0:
            raise SettingsError(f"--sparsity must be between 0 and 1, got {self.sparsity}")
        if self.granularity not in GRANULARITIES:
            raise SettingsError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'")
        if self.loss not in LOSSES:
            raise SettingsError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.retrieval_loss not in LOSSES:
            raise SettingsError(f"--retrieval-loss must be one of {', '.join(LOSSES)}, got '{self.retrieval_loss}'")
        if self.method not in METHODS:
            raise SettingsError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        check_retrieval_mix(self.retrieval_fraction, self.retrieval_formats)
        if self.retrieval_filter not in RETRIEVAL_FILTERS:
            raise SettingsError(f"--retrieval-filter must be one of {', '.join(RETRIEVAL_FILTERS)}, "
                                f"got '{self.retrieval_filter}'")
        if self.calibration_haystack not in CALIBRATION_HAYSTACKS:
            raise SettingsError(f"--calibration-haystack must be one of {', '.join(CALIBRATION_HAYSTACKS)}, "
                                f"got '{self.calibration_haystack}'")
        if self.attention_backend == "fa4" and self.compile:
            raise SettingsError("--attention-backend fa4 cannot be combined with --compile (flash-attn-4's kernels "
                                "are not traced by torch.compile; not measured)")
        if self.skip_closed_gates and self.compile:
            raise SettingsError("--skip-closed-gates cannot be combined with --compile (each set of open heads "
                                "would be another compiled graph)")
        if self.cuda_graphs and self.compile:
            raise SettingsError("--cuda-graphs cannot be combined with --compile (choose one way to cut the host's work)")
        if self.cuda_graphs and self.skip_closed_gates:
            raise SettingsError("--cuda-graphs cannot be combined with --skip-closed-gates (a captured step runs one "
                                "fixed set of heads)")
        if self.l1_weight < 0:
            raise SettingsError(f"--l1-weight must be >= 0, got {self.l1_weight}")
        if not self.teacher_cache_gib >= 0:  # (also NaN)
            raise SettingsError(f"--teacher-cache-gib must be >= 0, got {self.teacher_cache_gib}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise SettingsError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                f"got '{self.attention_backend}'")
        if self.dtype not in DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        for name in ("window", "seq_len", "steps", "batch_size", "seeds"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.window >= self.seq_len:
            raise SettingsError(
                f"--window ({self.window}) must be smaller than --seq-len ({self.seq_len}), or sliding-window "
                "and full attention are identical and there is nothing to learn"
            )
        if self.sink_tokens is not None and self.sink_tokens < 0:
            raise SettingsError(f"--sink-tokens must be >= 0, got {self.sink_tokens}")
        if self.target_warmup_steps < 0:
            raise SettingsError("--target-warmup-steps must be >= 0")
        if self.checkpoint_every < 0:
            raise SettingsError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if not self.stretch_low < 0.0 < 1.0 < self.stretch_high:
            raise SettingsError("the stretch interval must satisfy stretch_low < 0 < 1 < stretch_high")
        if self.penalty_init < 0:
            raise SettingsError(f"--penalty-init must be >= 0, got {self.penalty_init}")
        if self.temperature <= 0 or self.gate_lr <= 0 or self.multiplier_lr < 0:
            raise SettingsError("temperature and gate_lr must be > 0, multiplier_lr >= 0")


HEAL_TRAINABLE = ("attention", "sliding", "all")


@dataclass
class HealSettings:
    """Everything ``consa heal`` needs: the weights trained under a fixed allocation to reproduce the dense model.

    The defaults are the run of docs/results.md 1g.17 on SmolLM2-135M at sparsity 0.75 (the 4-seed vote): KL to the
    dense model on every token of 400 held-out-split Wikipedia sequences of 1024 tokens, one per step, q/k/v/o of
    every layer, AdamW at 5e-5 with 10 warm-up steps and a cosine decay. It lifted passkey + multikey retrieval on
    288 prompts from 76% to 92-94.5% of dense (three seeds) and perplexity from +0.036 to +0.005 nats/token of
    dense, in 109 s of eager steps on an H200 (130 s in all; the CUDA graphs replayed there by default since make a
    step 4x faster, docs/benchmarks.md). Natural text alone did as well as a half-retrieval mix
    (94.1%), so none is the default.
    """

    model: str | None = None  # None: the model the allocation names
    data: str = EMBEDDED_CORPUS
    seq_len: int = 1024
    steps: int = 400
    batch_size: int = 1
    lr: float = 5e-5
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    # attention: q/k/v/o of every layer; sliding: only those of layers with a sliding unit; all: every weight but
    # the input embeddings (1g.17: attention 94.1%, all 91.3% of dense retrieval, the same perplexity).
    train: str = "attention"
    retrieval_fraction: float = 0.0  # share of synthetic retrieval samples (held-out formats) in the healing data
    retrieval_formats: str = DEFAULT_CALIBRATION_FORMATS
    max_needles: int = MAX_NEEDLES  # facts per retrieval sample, at most (one queried, the rest distractors)
    # Extra weight of the KL on a retrieval sample's answer tokens: its loss is the mean KL over every token plus
    # answer_weight x the mean over the answer's. At 0 the answer (3-5 of 1024 tokens) is all but unseen; it is
    # where the dense model picks the queried key among the distractors (the 0.5 deficit, docs/results.md 1g.17).
    answer_weight: float = 0.0
    seed: int = 0
    device: str = "auto"
    attention_backend: str = "auto"  # auto: sdpa (consa_cli.heal: faster than flex here, measured)
    # Capture the student's forward and backward and the teacher's forward as CUDA graphs (consa_cli.heal): None is
    # on for CUDA with the sdpa backend, where a step went from 232 to 63 ms on an H200 with the same KL.
    cuda_graphs: bool | None = None
    output: str = "runs/healed"

    def validate(self) -> None:
        if self.train not in HEAL_TRAINABLE:
            raise SettingsError(f"--train must be one of {', '.join(HEAL_TRAINABLE)}, got '{self.train}'")
        for name in ("seq_len", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:  # (also NaN)
            raise SettingsError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise SettingsError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.max_grad_norm > 0:
            raise SettingsError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        check_retrieval_mix(self.retrieval_fraction, self.retrieval_formats)
        try:
            check_max_needles(self.max_needles)
        except DataError as error:
            raise SettingsError(str(error)) from None
        if not (self.answer_weight >= 0 and math.isfinite(self.answer_weight)):
            raise SettingsError(f"--answer-weight must be a finite number >= 0, got {self.answer_weight}")
        if self.answer_weight > 0 and self.retrieval_fraction == 0:
            raise SettingsError("--answer-weight weighs the answers of retrieval samples, and --retrieval-fraction 0 "
                                "makes none: give both or neither")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise SettingsError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                f"got '{self.attention_backend}'")


def load_recipe(path: str | Path, cls: type = SearchSettings) -> dict[str, Any]:
    """Read a recipe YAML into a dict of ``cls`` field values, rejecting unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SettingsError(f"recipe {path} must be a mapping of setting names to values")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"recipe {path} has unknown settings: {', '.join(unknown)}")
    return values


def build_settings(cls: type, recipe: str | Path | None = None, **overrides: Any):
    """Defaults <- recipe <- flags (``None`` flags mean 'not given'), then validated."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(load_recipe(recipe, cls))
    values.update({key: value for key, value in overrides.items() if value is not None})
    if recipe is not None and cls is SearchSettings:
        values = with_legacy_retrieval_loss(values)
    try:
        settings = cls(**values)
    except TypeError as error:
        raise SettingsError(str(error)) from None
    for f in fields(settings):
        expected = {"int": int, "float": (int, float), "str": str}.get(str(f.type))
        value = getattr(settings, f.name)
        if expected is not None and not isinstance(value, expected):
            raise SettingsError(f"setting '{f.name}' must be {f.type}, got {value!r}")
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def with_legacy_retrieval_loss(values: dict[str, Any]) -> dict[str, Any]:
    """Search settings written down before ``retrieval_loss`` existed (a recipe, a run's checkpoint) scored the
    retrieval sequences with ``loss``; without the key they go on doing so, so an old recipe or a resumed old run
    computes what it did. ``values`` is a mapping of setting names; the result has ``retrieval_loss``."""
    if "retrieval_loss" in values:
        return values
    return {**values, "retrieval_loss": values.get("loss", SearchSettings.loss)}


def settings_to_dict(settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


# What `consa search --resume` may change: the step budget, the optimiser's rates (to get past a NaN, say) and how
# often to checkpoint. Every other setting decides what the run computes, so it must stay as the run began.
RESUMABLE = ("steps", "gate_lr", "multiplier_lr", "penalty_init", "checkpoint_every", "compile", "skip_closed_gates",
             "teacher_cache_gib", "cuda_graphs")


def resumed_settings(saved: dict[str, Any], run_dir: str | Path, completed_steps: int,
                     recipe: str | Path | None = None, **overrides: Any) -> SearchSettings:
    """The settings of a run continued with ``--resume``: ``saved`` (its checkpoint's), changed only in RESUMABLE.

    ``recipe`` and ``overrides`` are what the user gave, as for :func:`build_settings`; a given value equal to the
    saved one is no conflict. The run stays in ``run_dir`` wherever it was first written.
    """
    # Runs checkpointed before the backend setting was renamed name it "backend"; those checkpointed before
    # retrieval_loss existed scored their retrieval sequences with loss.
    saved = {("attention_backend" if key == "backend" else key): value for key, value in saved.items()}
    saved = with_legacy_retrieval_loss(saved)
    run = build_settings(SearchSettings, None, **saved)
    given = load_recipe(recipe) if recipe is not None else {}
    given.update({key: value for key, value in overrides.items() if value is not None})
    output = given.pop("output", None)
    if output is not None and Path(output).resolve() != Path(run_dir).resolve():
        raise SettingsError(f"--resume continues a run with its own settings; --output differs (run: {run_dir}, "
                            f"given: {output})")
    for name, value in given.items():
        if name not in RESUMABLE and value != getattr(run, name):
            raise SettingsError(f"--resume continues a run with its own settings; --{name.replace('_', '-')} "
                                f"differs (run: {getattr(run, name)}, given: {value})")
    settings = build_settings(SearchSettings, None, **{**settings_to_dict(run), **given, "output": str(run_dir)})
    if settings.steps < completed_steps:
        raise SettingsError(f"--steps {settings.steps} is fewer than the {completed_steps} steps the run has done")
    return settings
