"""Where a decode step's time goes on the GPU: torch.profiler per variant, plus decode attention kernels alone.

Part 1 (``--variants``; with ``--prefill``, one prefill instead of decode steps): for each variant of ``bench/inference_speed.py`` (dense, transformers' native layer
hybrid, consa's layer and KV-head hybrids), prefill ``batch x context`` random tokens, decode a few warm-up steps,
then profile ``--steps`` decode steps. Per step: wall milliseconds, GPU kernel milliseconds (the sum of kernel
durations; ``kernel / wall`` near 1 means GPU-bound, far below 1 launch- or host-bound), kernel launches, and
the kernels and host ops that take the most time.

With ``--compiled-decode``, static caches and the decode step compiled into one CUDA graph (what
``bench/inference_speed.py --compiled-decode`` times).

Part 2 (``--attention``): one layer's decode attention alone (one query token per sequence against ``S`` cached
keys, GQA), for the head counts of a dense layer and of a KV-head hybrid's full heads, through consa's decode
path (SDPA without cuDNN), SDPA pinned to cuDNN or to flash, SDPA on repeated KV heads (transformers' path) and
two matmul formulations (``KERNELS``). Shapes stay fixed here, so cuDNN's per-shape plan is built once: part 1
shows what rebuilding it for every new key length costs during real decoding.

Part 3 (``--static-attention``): a static cache's decode attention (one query token against the whole fixed
buffer, unwritten slots masked) through the candidate kernels in ``STATIC_KERNELS``, each replayed as a CUDA graph.

    python bench/profile_decode.py --device cuda --contexts 8192,32768 --batches 1,8 \
        --json docs/results/profile_decode_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from inference_speed import QWEN3_0_6B, VARIANTS, build_variants, load
from torch.nn.attention import SDPBackend, sdpa_kernel

from consa_cli.efficiency import COMPILED_WARMUP_STEPS, cache_argument, compile_decode, new_cache
from consa_cli.hybrid_runtime import _flash_varlen_decode, repeat_kv, sdpa_backend


def decode_split_kv(query, key, value, scaling, chunk: int = 2048):
    """One query token per sequence, as two batched matmuls around a float32 softmax (a candidate that lost).

    The idea: a flash kernel without a split over the keys would run one thread block per (sequence, query
    head), leaving most of a large GPU idle for a KV-head hybrid's few full heads; here the score matmul tiles
    over the keys and the probability-value product is split into ``chunk``-key pieces. Measured on an H100,
    PyTorch's flash kernel already splits over the keys for one query token and is 2-3x faster than this.
    """
    batch, query_heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = query_heads // kv_heads
    # [B, H_kv, S, D] prefixes of a cache buffer merge their first two dims without a copy.
    keys, values = key.reshape(batch * kv_heads, length, dim), value.reshape(batch * kv_heads, length, dim)
    queries = (query * scaling).reshape(batch * kv_heads, groups, dim)
    if query.is_cuda:
        scores = torch.bmm(queries, keys.transpose(1, 2), out_dtype=torch.float32)
    else:
        scores = torch.bmm(queries.float(), keys.transpose(1, 2).float())
    probs = torch.softmax(scores, dim=-1).to(value.dtype)  # [B * H_kv, G, S]
    pieces = length // chunk
    if pieces < 2:
        out = torch.bmm(probs, values)
    else:
        split = pieces * chunk
        head = torch.matmul(probs[:, :, :split].reshape(-1, groups, pieces, chunk).transpose(1, 2),
                            values[:, :split].reshape(-1, pieces, chunk, dim)).sum(dim=1, dtype=torch.float32)
        if split < length:
            head = head + torch.bmm(probs[:, :, split:], values[:, split:]).float()
        out = head.to(value.dtype)
    return out.reshape(batch, query_heads, 1, dim)


# consa's decode path (``sdpa_backend``: SDPA without cuDNN for one query token), SDPA pinned to cuDNN / flash,
# what transformers' sdpa path does (KV heads repeated first), and two matmul formulations.
def _sdpa_on(backend):
    def kernel(query, key, value, scaling):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling,
                                                                    enable_gqa=query.shape[1] != key.shape[1])
    return kernel


KERNELS = {
    "sdpa": lambda q, k, v, s: sdpa_backend(q, k, v, None, False, s),
    "split-kv": decode_split_kv,
    "cudnn": _sdpa_on(SDPBackend.CUDNN_ATTENTION),
    "flash": _sdpa_on(SDPBackend.FLASH_ATTENTION),
    "sdpa-repeat-kv": lambda q, k, v, s: torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1]), scale=s),
    "matmul-unsplit": lambda q, k, v, s: decode_split_kv(q, k, v, s, chunk=1 << 30),
}


def _device_us(event) -> float:
    """Self device time of a profiler average in microseconds (the attribute's name changed across torch)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step, repeats: int) -> tuple[float, torch.profiler.profile, float]:
    """Run ``step`` ``repeats`` times under the profiler, then again unprofiled: (profiled ms, profiler, plain ms)
    per call. The plain timing is the one to quote: the profiler's own host overhead inflates the other."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    _synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _synchronize()
        profiled_ms = 1000.0 * (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _synchronize()
    return profiled_ms, profiler, 1000.0 * (time.perf_counter() - start) / repeats


def _summary(profiler, repeats: int, plain_ms: float, profiled_ms: float, top: int) -> dict:
    """Per-call kernel time, launches, and the top kernels and host ops of a profile of ``repeats`` calls."""
    averages = profiler.key_averages()
    kernels = [event for event in averages if _device_us(event) > 0 and event.device_type.name == "CUDA"]
    if not kernels:  # some torch versions report kernels with a CPU device type but device time
        kernels = [event for event in averages if _device_us(event) > 0 and not event.key.startswith("aten::")]
    host = sorted((event for event in averages if event.key.startswith("aten::")),
                  key=lambda event: event.self_cpu_time_total, reverse=True)
    kernel_ms = sum(_device_us(event) for event in kernels) / 1000.0 / repeats
    return {
        "wall_ms_per_step": plain_ms, "profiled_wall_ms_per_step": profiled_ms,
        "kernel_ms_per_step": kernel_ms, "gpu_busy_fraction": kernel_ms / plain_ms,
        "kernel_launches_per_step": sum(event.count for event in kernels) / repeats,
        "top_kernels": [{"name": event.key[:120], "ms_per_step": _device_us(event) / 1000.0 / repeats,
                         "calls_per_step": event.count / repeats}
                        for event in sorted(kernels, key=_device_us, reverse=True)[:top]],
        "top_host_ops": [{"name": event.key, "self_cpu_ms_per_step": event.self_cpu_time_total / 1000.0 / repeats,
                          "calls_per_step": event.count / repeats} for event in host[:top]],
    }


@torch.no_grad()
def profile_variant(model, context: int, batch: int, steps: int, top: int, compiled: bool = False) -> dict:
    """Profile ``steps`` greedy decode steps after a prefill; per-step summary of kernels and host ops.

    ``compiled``: static caches and the decode step compiled into a CUDA graph (``--compiled-decode``)."""
    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    max_cache_len = context + 2 * steps + COMPILED_WARMUP_STEPS + 8 if compiled else None  # _timed runs twice
    with_cache = {cache_argument(model): new_cache(model, max_cache_len), "use_cache": True}
    next_tokens = model(input_ids=tokens, logits_to_keep=1, **with_cache).logits[:, -1:].argmax(dim=-1)
    del tokens
    decode = compile_decode(model) if compiled else model
    for _ in range(COMPILED_WARMUP_STEPS if compiled else 3):  # warm-up: caches grow, kernels get picked
        next_tokens = decode(input_ids=next_tokens, **with_cache).logits[:, -1:].argmax(dim=-1)

    def step():
        nonlocal next_tokens
        next_tokens = decode(input_ids=next_tokens, **with_cache).logits[:, -1:].argmax(dim=-1)

    profiled_ms, profiler, plain_ms = _timed(step, steps)
    return {"phase": "decode", "context_length": context, "batch_size": batch, "steps": steps,
            **_summary(profiler, steps, plain_ms, profiled_ms, top)}


@torch.no_grad()
def profile_prefill(model, context: int, batch: int, top: int) -> dict:
    """Profile one prefill of ``batch x context`` random tokens (last-position logits, a fresh cache each time)."""
    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (batch, context), device=device)

    def step():
        model(input_ids=tokens, logits_to_keep=1, **{cache_argument(model): new_cache(model), "use_cache": True})

    step()  # warm-up: kernels get picked
    profiled_ms, profiler, plain_ms = _timed(step, 1)
    return {"phase": "prefill", "context_length": context, "batch_size": batch, "steps": 1,
            **_summary(profiler, 1, plain_ms, profiled_ms, top)}


@torch.no_grad()
def time_decode_attention(batch: int, query_heads: int, kv_heads: int, length: int, dim: int, dtype,
                          repeats: int = 50) -> dict:
    """Milliseconds of one decode attention call per kernel in KERNELS, and their max deviation."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(batch, query_heads, 1, dim, device="cuda", dtype=dtype, generator=generator)
    # Keys as the hybrid cache holds them: a prefix of a larger buffer.
    key = torch.randn(batch, kv_heads, length + 256, dim, device="cuda", dtype=dtype, generator=generator)[:, :, :length]
    value = torch.randn(batch, kv_heads, length + 256, dim, device="cuda", dtype=dtype, generator=generator)[:, :, :length]
    scaling = dim**-0.5
    reference = None
    row = {"batch": batch, "query_heads": query_heads, "kv_heads": kv_heads, "length": length}
    for name, kernel in KERNELS.items():
        try:
            out = kernel(query, key, value, scaling)
        except RuntimeError as error:  # a backend that does not take this shape
            row[f"{name}_error"] = str(error).splitlines()[0][:120]
            continue
        reference = out if reference is None else reference
        row[f"{name}_max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
        for _ in range(3):
            kernel(query, key, value, scaling)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            kernel(query, key, value, scaling)
        end.record()
        torch.cuda.synchronize()
        row[f"{name}_ms"] = start.elapsed_time(end) / repeats
    # What reading the keys and values once costs at full memory bandwidth, for scale.
    row["kv_mib"] = 2 * key.numel() * key.element_size() / 2**20
    return row


# A static cache's decode step: one query token against the whole fixed buffer, the slots not written yet masked.
# Candidates for that step (``--static-attention``): what consa's compiled decode calls today (masked SDPA, the GQA
# query heads folded into rows), FlexAttention's decoding kernel with the mask as a score_mod, and flash attention
# in its variable-length form over a token-major buffer, told each row's used length (``seqused_k``); flash on
# the written prefix alone (a dynamic cache's call) is the bound.
def _flex_masked():
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, fullgraph=True)

    def kernel(query, key, value, scaling, valid, key_tokens, value_tokens, used):
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(valid[b, kv_idx], score, -float("inf"))
        return compiled(query, key, value, score_mod=score_mod, scale=scaling, enable_gqa=True)
    return kernel


def _flash_seqused(query, key, value, scaling, valid, key_tokens, value_tokens, used):
    """consa's own call (``hybrid_runtime._flash_varlen_decode``): each row from slot 0, ``used`` slots."""
    return _flash_varlen_decode(query, key_tokens.transpose(1, 2), value_tokens.transpose(1, 2),
                                torch.zeros_like(used), used, scaling)


STATIC_KERNELS = {
    "flash-prefix": lambda q, k, v, s, valid, kt, vt, used: _sdpa_on(SDPBackend.FLASH_ATTENTION)(
        q, k[:, :, :int(used[0])], v[:, :, :int(used[0])], s),
    "static-sdpa-masked": lambda q, k, v, s, valid, kt, vt, used: sdpa_backend(q, k, v, valid[:, None, None], False, s),
    "flex-masked": None,  # built on first use (compiles)
    "flash-seqused": _flash_seqused,
}


@torch.no_grad()
def time_static_decode_attention(batch: int, query_heads: int, kv_heads: int, length: int, dim: int, dtype,
                                 free_slots: int = 256, repeats: int = 50) -> dict:
    """Milliseconds of one static-cache decode attention call per kernel in STATIC_KERNELS (each replayed as a
    CUDA graph, as compiled decoding runs it), and their max deviation from the first."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    slots = length + free_slots
    query = torch.randn(batch, query_heads, 1, dim, device="cuda", dtype=dtype, generator=generator)
    key_tokens = torch.randn(batch, slots, kv_heads, dim, device="cuda", dtype=dtype, generator=generator)
    value_tokens = torch.randn(batch, slots, kv_heads, dim, device="cuda", dtype=dtype, generator=generator)
    key, value = key_tokens.transpose(1, 2).contiguous(), value_tokens.transpose(1, 2).contiguous()
    valid = (torch.arange(slots, device="cuda") < length).expand(batch, slots).contiguous()
    used = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    args = (query, key, value, dim**-0.5, valid, key_tokens, value_tokens, used)
    row = {"batch": batch, "query_heads": query_heads, "kv_heads": kv_heads, "length": length, "slots": slots}
    reference = None
    for name, kernel in STATIC_KERNELS.items():
        try:
            kernel = kernel or _flex_masked()
            out = kernel(*args)
            reference = out if reference is None else reference
            row[f"{name}_max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
            for _ in range(3):
                kernel(*args)
            torch.cuda.synchronize()
            replay = torch.cuda.CUDAGraph()
            if name == "flash-prefix":  # reads the used length on the host: not capturable, timed eagerly
                replay = None
            else:
                with torch.cuda.graph(replay):
                    kernel(*args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                replay.replay() if replay is not None else kernel(*args)
            end.record()
            torch.cuda.synchronize()
            row[f"{name}_ms"] = start.elapsed_time(end) / repeats
        except Exception as error:  # noqa: BLE001 -- a candidate that does not take this shape is reported
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    row["kv_mib"] = 2 * batch * kv_heads * length * dim * key.element_size() / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=8, help="profiled decode steps per variant")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--full-fraction", type=float, default=0.25)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="'' skips part 1")
    parser.add_argument("--attention", action="store_true", help="part 2: decode attention kernels alone")
    parser.add_argument("--static-attention", action="store_true",
                        help="part 3: a static cache's masked decode attention, candidate kernels alone")
    parser.add_argument("--compiled-decode", action="store_true",
                        help="part 1 profiles compiled decode steps (static caches, one CUDA graph per step)")
    parser.add_argument("--prefill", action="store_true", help="part 1 profiles one prefill instead of decoding")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    contexts = [int(n) for n in args.contexts.split(",")]
    batches = [int(n) for n in args.batches.split(",")]
    report = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "variants": [], "attention": []}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    # Parts 2 and 3: one layer's decode attention, for a dense layer's heads and a KV-head hybrid's full heads.
    heads, kv_heads, dim = QWEN3_0_6B["num_attention_heads"], QWEN3_0_6B["num_key_value_heads"], QWEN3_0_6B["head_dim"]
    full_kv = max(1, round(kv_heads * args.full_fraction))
    for wanted, key, timer in ((args.attention, "attention", time_decode_attention),
                               (args.static_attention, "static_attention", time_static_decode_attention)):
        for length, batch in ((length, batch) for length in contexts for batch in batches) if wanted else ():
            for q_heads, k_heads in ((heads, kv_heads), (heads * full_kv // kv_heads, full_kv)):
                row = timer(batch, q_heads, k_heads, length, dim, dtype)
                report.setdefault(key, []).append(row)
                save()
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    if args.variants:
        model = load("qwen3-0.6b-random", dtype, args.device)
        available = build_variants(model, "qwen3-0.6b-random", args.device, dtype, args.window, None,
                                   args.full_fraction)
        for context in contexts:
            for batch in batches:
                for name in args.variants.split(","):
                    label, _, enter = available[name]
                    with enter() as variant:
                        profiled = (profile_prefill(variant, context, batch, args.top) if args.prefill else
                                    profile_variant(variant, context, batch, args.steps, args.top, args.compiled_decode))
                        row = {"variant": name, **profiled}
                    torch.cuda.empty_cache()
                    report["variants"].append(row)
                    save()
                    print(f"{name:14s} T={context:6d} B={batch} wall {row['wall_ms_per_step']:7.2f} ms/step "
                          f"kernels {row['kernel_ms_per_step']:7.2f} ms ({row['gpu_busy_fraction']:.0%} busy) "
                          f"launches {row['kernel_launches_per_step']:.0f}", flush=True)
                    for kernel in row["top_kernels"][:4]:
                        print(f"    {kernel['ms_per_step']:7.3f} ms x{kernel['calls_per_step']:.0f} {kernel['name'][:90]}")
                    for op in row["top_host_ops"][:3]:
                        print(f"    host {op['self_cpu_ms_per_step']:7.3f} ms x{op['calls_per_step']:.0f} {op['name']}")


if __name__ == "__main__":
    main()
