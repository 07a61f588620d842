"""Where one layer's search attention (the full + sliding-window mix, forward + backward) spends its time, per
backend: a torch profiler table of the top CUDA kernels (docs/benchmarks.md, "The flash backend, measured").

    python bench/profile_search_kernels.py --tokens 4096 --backends flash,flex
    python bench/profile_search_kernels.py --tokens 8192 --backends dense,flex,flex-qc0   # flex without query chunks

Qwen3-0.6B's attention shape (16 query / 8 KV heads, head_dim 128), bf16, window 512 + 4 sinks, inputs in the
layout transformers hands over; 3 untimed passes (compilation), then ``--passes`` profiled ones.
"""

from __future__ import annotations

import argparse

import torch
from search_speed import register_chunked_flex
from torch.profiler import ProfilerActivity, profile

from consa_cli.attention import ATTENTION_BACKENDS


def dense_causal(query, key, value, weight, scaling, window, sink_tokens):
    """The dense model's attention call (transformers: causal SDPA with GQA), the same arguments as a backend."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--backends", default="flash,flex",
                        help="comma-separated search backends; 'dense' profiles the dense model's causal SDPA call; "
                             "flex-qcN: flex with its window over query chunks of N (0: none)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--rows", type=int, default=18, help="kernels shown per backend")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_search_kernels.py profiles CUDA kernels: run it on a GPU")
    torch.manual_seed(0)
    heads, kv_heads, dim = 16, 8, 128
    query, key, value = (torch.randn(1, args.tokens, h, dim, device="cuda", dtype=torch.bfloat16)
                         .transpose(1, 2).requires_grad_() for h in (heads, kv_heads, kv_heads))
    weight = torch.rand(kv_heads, device="cuda").requires_grad_()
    for name in args.backends.split(","):
        if name.startswith("flex-qc"):
            register_chunked_flex(int(name.removeprefix("flex-qc")))
        mix = ATTENTION_BACKENDS[name].full_and_sliding if name != "dense" else dense_causal

        def once(mix=mix):
            out = mix(query, key, value, weight, dim ** -0.5, args.window, args.sink_tokens)
            out.backward(torch.ones_like(out))

        for _ in range(3):
            once()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.passes):
                once()
            torch.cuda.synchronize()
        print(f"===== {name}, {args.tokens} tokens, {args.passes} forward + backward passes")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
