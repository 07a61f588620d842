"""Search-step speed against a plain dense forward + backward of the same model, and the attention kernel alone.

A Qwen3-0.6B-shaped model (its real config, random weights, bfloat16; the hub is unreachable here), frozen weights,
one sequence per step. Columns per sequence length and loss:

* dense: ``model(inputs_embeds)`` + next-token loss + backward to the (grad-requiring) embeddings, SDPA attention;
* search: consa's own search loop (``run_search``: gates, teacher forward for KL, backward, optimiser steps) with
  each ``--backends`` entry (space- or comma-separated): ``flex`` (SDPA full + FlexAttention window), ``flash``
  (SDPA full + PyTorch's flash kernel with its own window, the sinks beyond the window merged by log-sum-exp) and
  ``sdpa`` (the reference: full + blocked sliding-window SDPA calls); ``NAME+compile`` (e.g. ``flex+compile``) is
  that backend with the search's ``--compile`` (the gated forward through torch.compile; the dense step stays
  eager, as transformers runs it); ``NAME+skip`` with ``--skip-closed-gates`` (the full branch only for heads whose
  gate sample is not exactly 0; ``--log-alpha-init -2`` starts the gates partly closed, as later in a search, and the
  row records the share of closed heads).

The attention-alone rows time one layer's forward + backward of the dense causal SDPA call and of each backend's
full-and-sliding mix (``sdpa``, ``flex``, ``flash``). A backend that fails (a kernel the installed torch lacks) is
recorded as ``failed: ...`` in its cells and the run goes on.

Tokens/s are from the median step after warm-up (the first steps compile the kernels); the dense step is measured
before and after the searches and the faster median kept (a conservative ratio); ``--rounds N`` repeats it all N
times (every other round in reverse order) and pools the timed steps, listing each round's own ratio too -- the
speed of one machine drifts by up to ~15% within an hour (docs/benchmarks.md, session 10); peak memory is
``torch.cuda.max_memory_allocated``. The projected search time is the recipe's step count times the measured step
plus the measured warm-up. Results go to ``--json`` after every row. ``--flex-configs`` adds tuning candidates
for the flex window (the block mask's tile, FlexAttention's kernel options) to the attention-alone rows;
``--kernels-only`` skips the model steps. ``--flex-query-chunks 0 512`` adds the flex backend with its window
over query chunks of that size (``flex_full_and_sliding(query_chunk=N)``; 0: no chunks, the flex backend before
session 10; ``flex`` itself uses ``kernels.default_query_chunk``: 1024 with sinks, none without) as backends
``flex-qcN``, to the step rows and the attention-alone rows. ``--device-busy`` replaces the step rows by the
device's kernel time per step against the step's wall time (torch.profiler): how much of a step the host costs.
Bench-only variants (session 15): ``flex-unfused`` (the full branch as an eager SDPA call before the compiled window,
the flex backend up to session 14) and ``flex-graphs`` (flex's one compiled graph per layer replayed as CUDA
graphs); ``fa4`` is the package's backend (flash-attn-4 installed). ``--thin`` keeps Qwen3-0.6B's layers and heads
with every width tiny, so a step's wall time is about its host time. With ``--rounds`` above 1 each row also has
``NAME_vs_dense_round_median``, the median of the paired per-round ratios.

    python bench/search_speed.py --lengths 4096 8192 --kernels-only --json /tmp/flex-sweep.json \
        --flex-configs '[{"block_size": 64}, {"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64}}]'

    python bench/search_speed.py --lengths 4096 8192 --json docs/results/search-speed-h100.json

    python bench/search_speed.py --lengths 4096 8192 --backends flash,flex,sdpa \
        --json docs/results/search-speed-h200.json

    python bench/search_speed.py --lengths 4096 8192 --losses lm --backends flex --flex-query-chunks 0 512 \
        --repeats 16 --json /tmp/flex-chunks.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from consa_cli.attention import ATTENTION_BACKENDS, KERNELS, AttentionBackend
from consa_cli.kernels import flex_full_and_sliding, prepare_flex
from consa_cli.losses import next_token_loss
from consa_cli.search import environment_versions, run_search
from consa_cli.settings import SearchSettings, load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "qwen3-0.6b-kv-head-per-layer.yaml"
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, max_position_embeddings=40960, rms_norm_eps=1e-6)
# Qwen3-0.6B's layers, heads and sequence, every width tiny: the device's work is small, so a step's wall time is
# about the host's time to launch it (what bounds the 4096-token step, docs/benchmarks.md sessions 11-15).
THIN = dict(QWEN3_0_6B, vocab_size=2048, hidden_size=128, intermediate_size=128, head_dim=16)
TINY = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def build_model(shape: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(**shape)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def dense_step_seconds(model, input_ids: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Plain forward + next-token loss + backward to the embeddings (weights frozen), per step."""
    embedding = model.get_input_embeddings()
    seconds = []
    for _ in range(warmup + repeats):
        synchronize(input_ids.device)
        started = time.perf_counter()
        embeds = embedding(input_ids).detach().requires_grad_()
        loss = next_token_loss(model(inputs_embeds=embeds, use_cache=False).logits, input_ids)
        loss.backward()
        synchronize(input_ids.device)
        seconds.append(time.perf_counter() - started)
    return seconds


# NAME+compile: --compile; NAME+skip: --skip-closed-gates; NAME+graphs: --compile with torch.compile's
# mode="reduce-overhead" (the forwards and their backward replayed as CUDA graphs); NAME+cached: every step reads one
# calibration sequence, so after the first the KL teacher's hidden state comes from the search's teacher cache (the
# steady state of a search longer than its calibration set; without it every step is a new sequence); NAME+chunks: the
# losses as compiled chunk functions instead of the fused Triton kernels (consa_cli.losses.FUSED_KERNELS off);
# NAME+cudagraphs: the search's --cuda-graphs (its gated forward and backward captured once, replayed every step);
# NAME+noguards: after the first step, torch.compile's guards are evaluated only where they tell its compiled variants
# apart (torch.compiler.set_stance(skip_guard_eval_unsafe=True)): the compiled window + mix's guard checks are host
# time on every layer of every step (session 13's host tables: 112 dynamo cache lookups of 69 us per 4096-token step).
SEARCH_OPTIONS = ("compile", "skip", "graphs", "cached", "chunks", "noguards", "cudagraphs")


def search_step_seconds(model, length: int, loss: str, backend: str, warmup: int, repeats: int,
                        window: int, sinks: int, log_alpha_init: float = 5.0,
                        on_step=None, batch_size: int = 1) -> tuple[list[float], list[float]]:
    """consa's search loop itself, timed per step by its own metrics (each step ends in a host sync): the seconds
    and the share of closed heads of every step. ``backend`` may end in ``+compile`` (the search's ``--compile``)
    and / or ``+skip`` (``--skip-closed-gates``); ``log_alpha_init`` below the default 5 starts the gates partly
    closed, as they are later in a search."""
    backend, *options = backend.split("+")
    if "noguards" in options:
        rest = "+".join([backend, *(o for o in options if o != "noguards")])

        def after_warmup(record, on_step=on_step):
            if record["step"] == 1:  # every compiled variant of the loop exists after its first step
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            if on_step is not None:
                on_step(record)

        try:
            return search_step_seconds(model, length, loss, rest, warmup, repeats, window, sinks, log_alpha_init,
                                       after_warmup, batch_size)
        finally:
            torch.compiler.set_stance("default")
    if backend == "flex-graphs" and not getattr(on_step, "marks_steps", False):
        def mark_step(record, on_step=on_step):  # CUDA graph trees: the next forward starts a new step's graphs
            torch.compiler.cudagraph_mark_step_begin()
            if on_step is not None:
                on_step(record)

        mark_step.marks_steps = True
        return search_step_seconds(model, length, loss, "+".join([backend, *options]), warmup, repeats, window, sinks,
                                   log_alpha_init, mark_step, batch_size)
    if "chunks" in options:
        import consa_cli.losses

        consa_cli.losses.FUSED_KERNELS = False
        try:
            return search_step_seconds(model, length, loss, "+".join([backend, *(o for o in options if o != "chunks")]),
                                       warmup, repeats, window, sinks, log_alpha_init, on_step, batch_size)
        finally:
            consa_cli.losses.FUSED_KERNELS = True
    settings = SearchSettings(granularity="kv-head-per-layer", sparsity=0.75, window=window, seq_len=length,
                              steps=warmup + repeats, loss=loss, attention_backend=backend, target_warmup_steps=0,
                              compile=bool({"compile", "graphs"} & set(options)), skip_closed_gates="skip" in options,
                              cuda_graphs="cudagraphs" in options,
                              log_alpha_init=log_alpha_init, batch_size=batch_size)
    count = batch_size if "cached" in options else settings.steps * batch_size
    sequences = torch.randint(0, model.config.vocab_size, (count, length),
                              generator=torch.Generator().manual_seed(1))
    if "graphs" in options:
        import consa_cli.search

        plain = consa_cli.search.compile_forward
        consa_cli.search.compile_forward = partial(torch.compile, dynamic=False, mode="reduce-overhead")
        try:
            result = run_search(settings, model, sequences, sinks, on_step=on_step)
        finally:
            consa_cli.search.compile_forward = plain
    else:
        result = run_search(settings, model, sequences, sinks, on_step=on_step)
    assert result.allocation.metadata["attention_backend"] == backend
    return [record["seconds"] for record in result.metrics], [record.get("closed_heads", 0.0)
                                                              for record in result.metrics]


def kernel_milliseconds_per_step(profiler, steps: int) -> float:
    """Device time of every kernel and copy the profiler saw, per step (one stream: the time the device was busy).
    Only the device's own events count: with the CPU activity on, an operator's row repeats its kernels' time."""
    from torch.autograd import DeviceType

    return sum(event.self_device_time_total for event in profiler.key_averages()
               if event.device_type != DeviceType.CPU) / 1000 / steps


def device_busy(model, input_ids: torch.Tensor, length: int, losses: list[str], backends: list[str], args) -> dict:
    """Per step, the device's kernel time against the step's wall time, for the dense step and each search: the share
    of the step the device was busy (the rest it waited for the host). Timed steps after the warm-up only, under
    torch.profiler (CUDA activity only); the wall time is the profiled steps' own median, profiler overhead
    included, so the busy share is a lower bound."""
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    # (On a CPU, for a smoke test: the CPU activity, whose events have no device time.)
    activities = [ProfilerActivity.CUDA if input_ids.is_cuda else ProfilerActivity.CPU]
    if args.host_tables:  # the host's side too: which operators take its time (slower: profiler overhead)
        activities = sorted({*activities, ProfilerActivity.CPU}, key=str)
        args.host_tables.mkdir(parents=True, exist_ok=True)

    def host_table(name: str, profiler) -> None:
        if args.host_tables:
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
            (args.host_tables / f"host-{length}-{name.replace('/', '-')}.txt").write_text(
                f"{name}, {length} tokens, {args.repeats} profiled steps (self CPU time: the host's own work)\n"
                + table)

    profiler = profile(activities=activities)
    dense_step_seconds(model, input_ids, args.warmup, 0)
    with profiler:
        wall = dense_step_seconds(model, input_ids, 0, args.repeats)
    rows["dense"] = {"wall_ms": round(1000 * statistics.median(wall), 1),
                     "kernel_ms": round(kernel_milliseconds_per_step(profiler, args.repeats), 1)}
    host_table("dense", profiler)
    for loss in losses:
        for backend in backends:
            profiler = profile(activities=activities)

            def around(record, profiler=profiler):
                if record["step"] == args.warmup:
                    profiler.start()
                elif record["step"] == args.warmup + args.repeats:
                    profiler.stop()

            try:
                seconds, _ = search_step_seconds(model, length, loss, backend, args.warmup, args.repeats,
                                                 args.window, args.sink_tokens, args.log_alpha_init, on_step=around,
                                                 batch_size=args.batch_size)
            except Exception as error:  # noqa: BLE001 -- recorded; the others still run
                rows[f"{loss}/{backend}"] = {"failed": failure(error)}
                continue
            rows[f"{loss}/{backend}"] = {
                "wall_ms": round(1000 * statistics.median(seconds[args.warmup:]), 1),
                "kernel_ms": round(kernel_milliseconds_per_step(profiler, args.repeats), 1)}
            host_table(f"{loss}/{backend}", profiler)
    for row in rows.values():
        if "wall_ms" in row:
            row["busy_share"] = round(row["kernel_ms"] / row["wall_ms"], 3) if row["wall_ms"] else None
    return {"tokens": length, **rows}


def register_chunked_flex(chunk: int) -> str:
    """Add the flex backend with its window over query chunks of ``chunk`` as ``flex-qc<chunk>`` (this process)."""
    name = f"flex-qc{chunk}"
    ATTENTION_BACKENDS[name] = AttentionBackend(KERNELS["sdpa"], partial(flex_full_and_sliding, query_chunk=chunk),
                                                prepare_flex)
    return name


def register_cpp_wrapper_flex() -> str:
    """Add the flex backend with its compiled window and mix built with inductor's C++ wrapper as ``flex-cpp``
    (this process): the host tables of session 13 put the Python wrapper's calls first among the search step's extra
    host time at 4096 tokens."""
    ATTENTION_BACKENDS["flex-cpp"] = AttentionBackend(
        KERNELS["sdpa"], partial(flex_full_and_sliding, compile_options=(("cpp_wrapper", True),)), prepare_flex)
    return "flex-cpp"


def register_flex_variants() -> None:
    """Add, for this process: ``flex-unfused``, the flex backend with the full branch as an eager SDPA call before
    the compiled window (the backend up to session 14), and ``flex-graphs``, the flex backend's one compiled graph
    per layer replayed as CUDA graphs (inductor's ``triton.cudagraphs``; the search step marks each step's start)."""
    ATTENTION_BACKENDS["flex-unfused"] = AttentionBackend(
        KERNELS["sdpa"], partial(flex_full_and_sliding, fuse_full=False), prepare_flex)
    ATTENTION_BACKENDS["flex-graphs"] = AttentionBackend(
        KERNELS["sdpa"], partial(flex_full_and_sliding, compile_options=(("triton.cudagraphs", True),)), prepare_flex)


def failure(error: Exception) -> str:
    """A failed measurement's cell: the first line of its error."""
    return f"failed: {str(error).splitlines()[0][:160] if str(error) else type(error).__name__}"


def cuda_milliseconds(call, warmup: int, repeats: int) -> float:
    """Median time of ``call()`` in ms (CUDA events around each call), after ``warmup`` untimed calls."""
    times = []
    for index in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_milliseconds(fn, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median fwd + bwd time of ``fn(*inputs)`` in ms (CUDA events), after a compiling warm-up."""
    def once():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return round(cuda_milliseconds(once, 3, repeats), 3)


def kernel_rows(length: int, shape: dict, window: int, sinks: int, device: torch.device, repeats: int,
                flex_configs: list[dict] = (), backends: tuple[str, ...] = ("sdpa", "flex", "flash")) -> dict:
    heads, kv_heads, dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(*size):
        return torch.randn(*size, device=device, dtype=torch.bfloat16, generator=generator)

    # The layout transformers hands over: [B, T, H, D] transposed to [B, H, T, D].
    query, key, value = (tensor(1, length, h, dim).transpose(1, 2).requires_grad_() for h in (heads, kv_heads, kv_heads))
    weight = torch.rand(kv_heads, device=device, generator=generator).requires_grad_()
    scaling = dim ** -0.5

    def dense_causal(q, k, v):  # what the dense model's SDPA attention does (transformers: GQA in SDPA)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                enable_gqa=True)

    row = {"dense_causal_sdpa_ms": kernel_milliseconds(dense_causal, [query, key, value], repeats)}
    for backend in backends:
        def mix(q, k, v, w, backend=backend):
            return ATTENTION_BACKENDS[backend].full_and_sliding(q, k, v, w, scaling, window, sinks)

        try:
            row[f"search_{backend}_ms"] = kernel_milliseconds(mix, [query, key, value, weight], repeats)
        except Exception as error:  # noqa: BLE001 -- recorded; the other rows are still worth the GPU call
            row[f"search_{backend}_ms"] = failure(error)
    for config in flex_configs:  # tuning candidates: the mask's tile and FlexAttention's kernel options
        label = json.dumps(config, sort_keys=True)

        def tuned(q, k, v, w, config=config):
            return flex_full_and_sliding(q, k, v, w, scaling, window, sinks, **config)

        try:
            row.setdefault("flex_configs_ms", {})[label] = kernel_milliseconds(tuned, [query, key, value, weight],
                                                                               repeats)
        except Exception as error:  # noqa: BLE001 -- a candidate the compiler rejects (e.g. out of shared memory)
            row.setdefault("flex_configs_ms", {})[label] = failure(error)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--losses", nargs="+", default=["lm", "kl"])
    parser.add_argument("--backends", nargs="+", default=["flex", "sdpa"],
                        help="search backends to time, space- or comma-separated (flex, flash, sdpa, eager; "
                             "flex-cpp: flex with its compiled window built with inductor's C++ wrapper); "
                             "NAME+compile times the search's --compile with that backend, NAME+skip its "
                             "--skip-closed-gates, NAME+graphs --compile as CUDA graphs (mode reduce-overhead), "
                             "NAME+cached the KL teacher read from the search's cache (one sequence revisited), "
                             "NAME+chunks the losses as compiled chunks instead of the fused Triton kernels, "
                             "NAME+noguards torch.compile's guards skipped after the first step")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="sequences per step, the search's and the dense step's alike (the search's "
                             "--batch-size); tokens/s count them all")
    parser.add_argument("--log-alpha-init", type=float, default=5.0,
                        help="the gates' starting log_alpha (search default 5: all open); lower values start them "
                             "partly closed, as later in a search, for NAME+skip rows")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (the first compiles the kernels)")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the dense step and every backend this many times, every other round in reverse "
                             "order; the row pools the rounds' timed steps and lists each round's ratio "
                             "(X_vs_dense_rounds: that round's dense median over its median), so run-to-run drift "
                             "shows and hits both sides of a comparison")
    parser.add_argument("--recipe-sequences", type=int, default=126,
                        help="distinct calibration sequences of the recipe (embedded:enwiki at 4096 tokens: 126 with "
                             "the SmolLM2 tokenizer, the one here; Qwen3's may differ a little), for the projected "
                             "recipe time of NAME+cached rows")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same layout (smoke test, CPU)")
    parser.add_argument("--thin", action="store_true",
                        help="Qwen3-0.6B's 28 layers and 16 / 8 heads with every width tiny: the wall time of a step is "
                             "then about the host's launch time (the dense step's and each search's)")
    parser.add_argument("--flex-configs", default="[]",
                        help='JSON list of flex tuning candidates timed in the kernel-alone rows, e.g. '
                             '\'[{"block_size": 64}, {"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64}}]\'')
    parser.add_argument("--kernels-only", action="store_true", help="only the attention-alone rows (tuning sweeps)")
    parser.add_argument("--kernel-backends", default="sdpa,flex,flash",
                        help="backends timed in the attention-alone rows (comma-separated; flex-qcN are added)")
    parser.add_argument("--steps-only", action="store_true", help="skip the attention-alone rows")
    parser.add_argument("--flex-query-chunks", type=int, nargs="*", default=[],
                        help="also time flex with its window over query chunks of each size (backends flex-qcN)")
    parser.add_argument("--device-busy", action="store_true",
                        help="instead of the timed rows: the device's kernel time per step against the step's wall "
                             "time (torch.profiler), for the dense step and each search (is the step bound by the "
                             "host?)")
    parser.add_argument("--host-tables", type=Path, default=None,
                        help="with --device-busy: also profile the host and write, per step kind, a table of the "
                             "operators by their own CPU time to this folder")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    args.backends = [name for entry in args.backends for name in entry.split(",") if name]
    chunked = [register_chunked_flex(chunk) for chunk in args.flex_query_chunks]
    if any(name.split("+")[0] == "flex-cpp" for name in args.backends):
        register_cpp_wrapper_flex()
    register_flex_variants()
    kernel_backends = [name for name in args.kernel_backends.split(",") if name]
    args.backends += chunked
    unknown = sorted({name for name in args.backends
                      if name.split("+")[0] not in ATTENTION_BACKENDS
                      or not set(name.split("+")[1:]) <= set(SEARCH_OPTIONS)})
    if unknown:
        parser.error(f"unknown --backends {', '.join(unknown)}; choose from {', '.join(ATTENTION_BACKENDS)}, each "
                     "optionally with +compile, +graphs, +skip, +cached, +chunks and / or +noguards")
    flex_configs = json.loads(args.flex_configs)
    if flex_configs or chunked:
        # Every candidate is another compiled graph of the same function, and dynamo's default recompile limit
        # (8 per code object) stopped the first sweep after the defaults: raise it for this process only.
        torch._dynamo.config.recompile_limit = 16 + 4 * (len(flex_configs) + len(chunked))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else THIN if args.thin else QWEN3_0_6B
    model = build_model(shape, device)
    # On a CPU only the backends that run there (the default list names CUDA ones: then sdpa and eager).
    backends = args.backends if device.type == "cuda" else (
        [name for name in args.backends if name.partition("+")[0] in ("sdpa", "eager")] or ["sdpa", "eager"])
    recipe = load_recipe(RECIPE)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": environment_versions(),
        "model": ("tiny Qwen3, random weights" if args.tiny else "Qwen3-0.6B layers and heads, tiny widths (host time)"
                  if args.thin else "Qwen3-0.6B shape, random weights, bfloat16"),
        "window": args.window, "sink_tokens": args.sink_tokens, "granularity": "kv-head-per-layer",
        "batch_size": args.batch_size,
        "rows": [], "kernels": [],
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    for length in args.lengths:
        if device.type == "cuda" and not args.steps_only:
            report["kernels"].append({"tokens": length, **kernel_rows(length, shape, args.window, args.sink_tokens,
                                                                      device, repeats=20, flex_configs=flex_configs,
                                                                      backends=(*kernel_backends, *chunked))})
            print(report["kernels"][-1], flush=True)
            save()
        if args.kernels_only:
            continue
        input_ids = torch.randint(0, shape["vocab_size"], (args.batch_size, length), device=device)
        if args.device_busy:
            report.setdefault("device_busy", []).append(device_busy(model, input_ids, length, args.losses, backends,
                                                                    args))
            print(report["device_busy"][-1], flush=True)
            save()
            continue
        dense_medians, dense_peak = [], None
        steps = {(loss, backend): [] for loss in args.losses for backend in backends}  # timed seconds, all rounds
        round_ratios = {(loss, backend): [] for loss in args.losses for backend in backends}
        rows = {loss: {"tokens": length, "loss": loss} for loss in args.losses}
        for round_index in range(args.rounds):
            reset_peak(device)
            dense = dense_step_seconds(model, input_ids, args.warmup, args.repeats)
            dense_medians.append(statistics.median(dense[args.warmup:]))
            dense_peak = peak_gib(device)
            # Every other round in reverse order, so a drift of the machine's speed within a round (clocks, the
            # host) does not always favour the backend timed first.
            order = backends if round_index % 2 == 0 else backends[::-1]
            for loss in args.losses:
                row = rows[loss]
                for backend in order:
                    if f"{backend}_failed" in row:
                        continue
                    reset_peak(device)
                    try:
                        seconds, closed = search_step_seconds(model, length, loss, backend, args.warmup,
                                                              args.repeats, args.window, args.sink_tokens,
                                                              args.log_alpha_init, batch_size=args.batch_size)
                    except Exception as error:  # noqa: BLE001 -- recorded; the other backends still run
                        row[f"{backend}_failed"] = failure(error)
                        continue
                    steps[loss, backend] += seconds[args.warmup:]
                    round_ratios[loss, backend].append(
                        round(dense_medians[-1] / statistics.median(seconds[args.warmup:]), 3))
                    row[f"{backend}_peak_gib"] = peak_gib(device)
                    row[f"{backend}_warmup_s"] = round(sum(seconds[:args.warmup]), 1)
                    if "skip" in backend.split("+")[1:]:
                        row[f"{backend}_closed_heads"] = round(statistics.mean(closed[args.warmup:]), 3)
                    if (length == recipe["seq_len"] and loss == recipe["loss"] and "cached" not in backend.split("+")
                            and args.batch_size == 1):  # (the recipe's batch)
                        step = statistics.median(seconds[args.warmup:])
                        row[f"{backend}_projected_recipe_minutes"] = round(
                            (sum(seconds[:args.warmup]) + step * (recipe["steps"] - args.warmup)) / 60, 1)
        for loss, row in rows.items():
            for backend in backends:
                uncached = "+".join(part for part in backend.split("+") if part != "cached")
                # (only where the uncached step was timed in this run too: it gives the first visits' time)
                if (args.batch_size == 1 and loss == "kl" and length == recipe["seq_len"] and backend != uncached
                        and steps[loss, backend] and steps.get((loss, uncached)) and loss == recipe["loss"]):
                    # The recipe with the teacher cache: a teacher forward at the first visit of each of its
                    # sequences (the uncached step), the cached step at every later one.
                    first_visits = min(args.recipe_sequences, recipe["steps"])
                    computing, recalling = statistics.median(steps[loss, uncached]), statistics.median(steps[loss, backend])
                    row[f"{backend}_projected_recipe_minutes"] = round(
                        (row[f"{uncached}_warmup_s"] + computing * (first_visits - args.warmup)
                         + recalling * (recipe["steps"] - first_visits)) / 60, 2)
                if steps[loss, backend]:
                    row[f"{backend}_seconds"] = statistics.median(steps[loss, backend])
                    if args.rounds > 1:
                        row[f"{backend}_vs_dense_rounds"] = round_ratios[loss, backend]
                        # The paired statistic: the pooled ratio below sets the slowest rounds' steps against the
                        # fastest round's dense step, so a machine drifting between rounds lowers it (session 15).
                        row[f"{backend}_vs_dense_round_median"] = round(statistics.median(round_ratios[loss, backend]),
                                                                        3)
        rows = list(rows.values())
        dense_seconds = min(dense_medians)
        dense_again = dense_step_seconds(model, input_ids, args.warmup, args.repeats)
        dense_seconds = min(dense_seconds, statistics.median(dense_again[args.warmup:]))
        compiled_dense = None
        if any("compile" in name.split("+")[1:] for name in backends):
            # A compiled search step next to a compiled dense step too: the fair reference for what compilation
            # itself buys (the goal's reference stays the eager dense step, as transformers runs it).
            try:
                compiled = dense_step_seconds(torch.compile(model, dynamic=False), input_ids, args.warmup,
                                              args.repeats)
                compiled_dense = statistics.median(compiled[args.warmup:])
            except Exception as error:  # noqa: BLE001 -- recorded; the eager rows stand
                compiled_dense = failure(error)
        for row in rows:
            row["dense_tokens_per_s"] = round(args.batch_size * length / dense_seconds)
            row["dense_peak_gib"] = dense_peak
            if isinstance(compiled_dense, str):
                row["dense_compiled_failed"] = compiled_dense
            elif compiled_dense is not None:
                row["dense_compiled_tokens_per_s"] = round(args.batch_size * length / compiled_dense)
            for backend in backends:
                if f"{backend}_failed" in row:
                    row.pop(f"{backend}_seconds", None)  # (a later round failed: no ratio from part of the rounds)
                    continue
                step = row.pop(f"{backend}_seconds")
                row[f"{backend}_tokens_per_s"] = round(args.batch_size * length / step)
                row[f"{backend}_vs_dense"] = round(dense_seconds / step, 3)
            report["rows"].append(row)
            print(row, flush=True)
        save()


if __name__ == "__main__":
    main()
