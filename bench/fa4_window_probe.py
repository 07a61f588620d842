"""Does flash-attn-4 run a sliding window on this GPU, forward and backward, and how fast? (issue 4)

flash-attn-4 (CuTe DSL; Hopper and Blackwell kernels) takes a local window (``window_size=(left, 0)``) and returns a
log-sum-exp that is differentiable (its backward takes ``dlse``). Both matter for search: the window is the branch
that keeps the search step below the dense step's speed (docs/benchmarks.md, sessions 8-15), and a differentiable
log-sum-exp lets the sink tokens be merged into a window kernel's output by autograd, which FlexAttention's and
PyTorch's flash kernels did not give us. Before a backend is built on it, this probe checks on the GPU machine:

1. correctness at 1024 tokens (16 / 8 heads, head_dim 128, window 128, bf16): the window's output, its
   log-sum-exp, and the q / k / v gradients of ``<out, g> + <lse, h>`` against a float32 SDPA reference;
2. speed, forward + backward of one layer (CUDA events, median of 20) at ``--lengths``: the dense causal SDPA call
   (what a dense step runs), flash-attn-4 causal, flash-attn-4 window (with and without the log-sum-exp), and
   consa's flex mix (full + window + sinks: what a search step runs now).

Every stage is written to ``--json`` as it finishes; a failing stage records its error and the others still run.

    python bench/fa4_window_probe.py --json fa4-probe.json
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from search_speed import cuda_milliseconds


def failure(error: Exception) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "failed: " + " ".join(line.strip() for line in lines)[:400]


def fa4(query, key, value, scale: float, window: int | None, lse: bool = False):
    """flash-attn-4 on ``[B, T, H, D]`` tensors: causal, and with ``window`` a query at q sees keys
    ``q - window < k <= q`` (``window_size=(window - 1, 0)``). Returns ``(out, lse or None)``."""
    from flash_attn.cute.interface import flash_attn_func

    result = flash_attn_func(query, key, value, softmax_scale=scale, causal=True,
                             window_size=(None if window is None else window - 1, 0), return_lse=lse)
    return result if isinstance(result, tuple) else (result, None)


def reference(query, key, value, scale: float, window: int):
    """float32 SDPA window on ``[B, T, H, D]`` inputs: ``(out [B, T, H, D], lse [B, H, T])``."""
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    positions = torch.arange(q.shape[-2], device=q.device)
    allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2), scores.logsumexp(-1)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want.float()).norm() / want.float().norm()).item(), 5)


def correctness(length: int = 1024, window: int = 128) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads):
        return torch.randn(1, length, heads, 128, device="cuda", dtype=torch.bfloat16, generator=generator)

    query, key, value = tensor(16), tensor(8), tensor(8)
    scale = 128 ** -0.5
    out_grad = torch.randn(1, length, 16, 128, device="cuda", generator=generator)
    lse_grad = torch.randn(1, 16, length, device="cuda", generator=generator)
    row = {"tokens": length, "window": window}
    exact_inputs = [t.float().requires_grad_() for t in (query, key, value)]
    exact_out, exact_lse = reference(*exact_inputs, scale, window)
    exact = torch.autograd.grad((exact_out * out_grad).sum() + (exact_lse * lse_grad).sum(), exact_inputs)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    out, lse = fa4(*inputs, scale, window, lse=True)
    row["lse_shape"] = list(lse.shape) if lse is not None else None
    row["out_error"] = relative(out, exact_out)
    lse_view = lse if lse is not None and lse.shape == exact_lse.shape else None
    if lse_view is None and lse is not None and lse.dim() == 3 and lse.shape[1] == length:
        lse_view = lse.transpose(1, 2)  # [B, T, H] -> [B, H, T]
    row["lse_error"] = relative(lse_view, exact_lse) if lse_view is not None else "lse missing or of another shape"
    objective = (out.float() * out_grad).sum() + ((lse_view * lse_grad).sum() if lse_view is not None else 0)
    grads = torch.autograd.grad(objective, inputs)
    row.update({f"d{name}_error": relative(got, want) for name, got, want in zip("qkv", grads, exact, strict=True)})
    return row


def speed(length: int, window: int, sinks: int) -> dict:
    from consa_cli.kernels import flex_full_and_sliding

    generator = torch.Generator(device="cuda").manual_seed(1)

    def tensor(heads):  # [B, T, H, D], the layout transformers projects into
        return torch.randn(1, length, heads, 128, device="cuda", dtype=torch.bfloat16,
                           generator=generator).requires_grad_()

    query, key, value = tensor(16), tensor(8), tensor(8)
    weight = torch.rand(8, device="cuda", generator=generator).requires_grad_()
    scale = 128 ** -0.5

    def backward(out):
        out.backward(torch.ones_like(out))

    def lse_backward(out, lse):
        (out.float().sum() + lse.sum()).backward()

    candidates = {
        "dense_causal_sdpa": lambda: backward(F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), is_causal=True, scale=scale,
            enable_gqa=True)),
        "fa4_causal": lambda: backward(fa4(query, key, value, scale, None)[0]),
        "fa4_window": lambda: backward(fa4(query, key, value, scale, window)[0]),
        "fa4_window_with_lse": lambda: lse_backward(*fa4(query, key, value, scale, window, lse=True)),
        "consa_flex_mix": lambda: backward(flex_full_and_sliding(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), weight, scale, window, sinks)),
    }
    row = {"tokens": length, "window": window, "sink_tokens_of_the_flex_mix": sinks}
    for name, call in candidates.items():
        try:
            row[f"{name}_ms"] = round(cuda_milliseconds(call, 3, 20), 3)
        except Exception as error:  # noqa: BLE001 -- recorded; the other candidates still run
            row[f"{name}_ms"] = failure(error)
        print(name, row[f"{name}_ms"], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this probe needs a CUDA GPU")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    try:
        from importlib.metadata import version

        report["flash_attn_4"] = version("flash-attn-4")
        report["nvidia_cutlass_dsl"] = version("nvidia-cutlass-dsl")
    except Exception as error:  # noqa: BLE001 -- the import below says more
        report["versions"] = failure(error)
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as error:  # noqa: BLE001
        report["import"] = failure(error)
        save()
        raise SystemExit(f"flash-attn-4 does not import: {report['import']}") from None
    try:
        report["correctness"] = correctness()
    except Exception as error:  # noqa: BLE001
        report["correctness"] = failure(error)
    print(report["correctness"], flush=True)
    save()
    for length in args.lengths:
        report["rows"].append(speed(length, args.window, args.sink_tokens))
        save()


if __name__ == "__main__":
    main()
