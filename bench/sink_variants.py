"""The sliding-window branch of a search step with 4 sink tokens, four ways, timed and checked against each other.

Session 8's profile (docs/benchmarks.md, "Session 8"): at 4096 tokens the sinks cost as much as the whole window
-- flex's window backward 0.48 ms with sinks in its block mask against 0.20 ms without, flash's sinks' share
0.34 ms on top of its 0.30 ms window. This script measures candidate fixes side by side on one GPU, one layer of
Qwen3-0.6B's attention shape (16 query / 8 KV heads, head_dim 128, bf16), forward + backward of the window output
alone (no full branch, no mix):

* ``flex-mask``: FlexAttention with the sinks in the block mask (the ``flex`` backend today);
* ``flex-lse``: FlexAttention over the window only, returning its log-sum-exp, and the sinks merged by
  log-sum-exp in plain torch ops, autograd through both (FlexAttention differentiates its log-sum-exp), compiled;
* ``flash``: flash attention's window plus the compiled sinks' share (the ``flash`` backend today);
* ``flash-chunked``: the same with the sinks' key and value gradients as a two-stage sum (chunks of the queries as
  batched matrix products, then a sum over chunks) instead of one reduction over all queries.

    python bench/sink_variants.py --tokens 4096 8192

Every variant's output and q / k / v gradients are compared with ``flex-mask``'s (relative max error); times are
the median of ``--iterations`` CUDA-event timings after 3 untimed passes (compilation).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from consa_cli import kernels


def chunked_sink_backward(grad_out, query, sink_key, sink_value, out, lse, scaling: float, window: int,
                          chunk_rows: int = 128):
    """:func:`consa_cli.kernels._sink_backward` with the sums over the queries in two stages."""
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // sink_key.shape[1]
    mask = kernels._sinks_beyond_window(query.shape[-2], window, sink_key.shape[-2], query.device)
    q, d_out = (kernels._grouped(t, groups, compute) for t in (query, grad_out))  # [B, Hkv, g, T, D]
    key, value = sink_key.to(compute)[:, :, None, None], sink_value.to(compute)[:, :, None, None]
    scores = (q.unsqueeze(-2) * key).sum(-1) * scaling  # [B, Hkv, g, T, S]
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - kernels._grouped(lse, groups, compute).unsqueeze(-1))
    delta = (d_out * kernels._grouped(out, groups, compute)).sum(-1, keepdim=True)
    grad_scores = probs * ((d_out.unsqueeze(-2) * value).sum(-1) - delta)
    grad_query = (grad_scores.unsqueeze(-1) * key).sum(-2).flatten(1, 2) * scaling
    batch, heads, _, _, sinks = grad_scores.shape
    rows = q.shape[2] * q.shape[3]
    chunks = rows // chunk_rows if rows % chunk_rows == 0 else 1

    def over_queries(weights, states):  # [B, Hkv, g, T, S], [B, Hkv, g, T, D] -> [B, Hkv, S, D]
        weights = weights.reshape(batch, heads, chunks, rows // chunks, sinks)
        states = states.reshape(batch, heads, chunks, rows // chunks, states.shape[-1])
        return torch.einsum("bhcks,bhckd->bhcsd", weights, states).sum(2)

    return grad_query, over_queries(grad_scores, q) * scaling, over_queries(probs, d_out)


def flex_lse_window(query, key, value, scaling, window, sink_tokens, mask):
    """The window over FlexAttention without sinks, the sinks merged by log-sum-exp (autograd through both)."""
    from torch.nn.attention.flex_attention import flex_attention

    out, lse = flex_attention(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True, return_lse=True)
    sinks = min(sink_tokens, max(query.shape[-2] - window, 0))
    merged, _ = kernels._sink_merge_forward(query, key[:, :, :sinks], value[:, :, :sinks], out, lse, scaling, window)
    return merged


def flex_mask_window(query, key, value, scaling, window, sink_tokens, mask):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)


def variants(tokens: int, window: int, sinks: int) -> dict:
    device = "cuda"
    with_sinks = kernels.window_block_mask(tokens, window, sinks, device)
    without = kernels.window_block_mask(tokens, window, 0, device)
    flex_mask = torch.compile(flex_mask_window, fullgraph=True, dynamic=False)
    flex_lse = torch.compile(flex_lse_window, fullgraph=True, dynamic=False)

    def flash(query, key, value, scaling):
        return kernels.SlidingWindowWithSinks.apply(query, key, value, scaling, window, sinks, kernels.FLASH_WINDOW)

    return {
        "flex-mask": lambda q, k, v, s: flex_mask(q, k, v, s, window, sinks, with_sinks),
        "flex-lse": lambda q, k, v, s: flex_lse(q, k, v, s, window, sinks, without),
        "flash": flash,
        "flash-chunked": flash,  # with chunked_sink_backward patched in around forward + backward (run)
    }


def run(fn, query, key, value, grad, scaling, patch_backward=None):
    for tensor in (query, key, value):
        tensor.grad = None
    original = kernels._sink_backward
    if patch_backward is not None:
        kernels._sink_backward = patch_backward
    try:
        out = fn(query, key, value, scaling)
        out.backward(grad)
    finally:
        kernels._sink_backward = original
    return out.detach(), [t.grad.detach().clone() for t in (query, key, value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sink_variants.py times CUDA kernels: run it on a GPU")
    rows = []
    for tokens in args.tokens:
        torch.manual_seed(0)
        heads, kv_heads, dim = 16, 8, 128
        query, key, value = (torch.randn(1, tokens, h, dim, device="cuda", dtype=torch.bfloat16)
                             .transpose(1, 2).requires_grad_() for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
        scaling = dim ** -0.5
        reference = None
        for name, fn in variants(tokens, args.window, args.sink_tokens).items():
            patch = chunked_sink_backward if name == "flash-chunked" else None
            once = functools.partial(run, fn, query, key, value, grad, scaling, patch)
            for _ in range(3):
                result = once()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.iterations):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                once()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            reference = reference or result
            errors = [float((a.float() - b.float()).abs().max() / b.float().abs().max())
                      for a, b in zip([result[0], *result[1]], [reference[0], *reference[1]], strict=True)]
            row = {"tokens": tokens, "variant": name, "ms": sorted(times)[len(times) // 2],
                   "max_rel_error_out_dq_dk_dv": errors}
            rows.append(row)
            print(f"{tokens:6d} {name:14s} {row['ms']:7.3f} ms  rel. error vs flex-mask (out, dq, dk, dv) "
                  + " ".join(f"{e:.1e}" for e in errors), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                 "window": args.window, "sink_tokens": args.sink_tokens,
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
