"""Issue 4, session 18: the graphed search step measured 0.90x dense at 8192 tokens in session 17 and 0.36x in this
session's rounds. What the mask function sees under capture, and the step with each of session 17's versions of its
check (main's, deciding before building; f1db81e's, building then dropping), side by side in one run (Qwen3-0.6B
shape, random weights). Found: under capture transformers passes allow_is_causal_skip=False (its packed-sequence
check cannot read position_ids while tracing), so both versions returned the T x T mask (docs/benchmarks.md, session
18). Kept as run; after the fix the search no longer uses the "consa" mask function, so it would log no calls."""
import json
import os
import statistics
import sys
from collections import Counter

import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from search_speed import QWEN3_0_6B, build_model, dense_step_seconds, search_step_seconds  # noqa: E402

import consa_cli.attention as attention  # noqa: E402
import consa_cli.hybrid_runtime as hybrid_runtime  # noqa: E402

seen = Counter()


def describe(args, kwargs, result):
    keys = ",".join(sorted(k for k in kwargs if k not in ("config", "dtype", "device", "mask_function")))
    capturing = torch.cuda.is_current_stream_capturing()
    return (f"args={len(args)} keys={keys} q={kwargs.get('q_length')} kv={kwargs.get('kv_length')} "
            f"am={'None' if kwargs.get('attention_mask') is None else tuple(kwargs['attention_mask'].shape)} "
            f"skip={kwargs.get('allow_is_causal_skip')} capturing={capturing} "
            f"result={'None' if result is None else tuple(result.shape)}")


def logged(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **dict(kwargs))
        seen[describe(args, kwargs, result)] += 1
        return result
    return wrapper


def build_then_drop(*args, **kwargs):  # session 17's measured version
    kwargs["mask_function"] = causal_mask_function
    kwargs.pop("local_size", None)
    mask = sdpa_mask(*args, **kwargs)
    if (mask is not None and kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip", True)
            and mask.dim() == 4 and mask.shape[-2] == mask.shape[-1]):
        return None
    return mask


VERSIONS = {"main": hybrid_runtime.causal_padding_mask, "build_then_drop": build_then_drop}


def use(function):
    AttentionMaskInterface.register(attention.ATTENTION_NAME, logged(function))


print({"transformers": transformers.__version__, "torch": torch.__version__,
       "gpu": torch.cuda.get_device_name()}, flush=True)
device = torch.device("cuda")
model = build_model(QWEN3_0_6B, device)
rows = []
for length in (8192, 4096):
    ids = torch.randint(0, 151936, (1, length), device=device)
    dense = statistics.median(dense_step_seconds(model, ids, 2, 5))
    for round_ in range(2):
        for name in (["main", "build_then_drop"] if round_ == 0 else ["build_then_drop", "main"]):
            for backend in ("flex+cached+cudagraphs", "flex+cached"):
                use(VERSIONS[name])
                seen.clear()
                seconds, _ = search_step_seconds(model, length, "lm", backend, 2, 5, 512, 4)
                row = {"tokens": length, "round": round_, "mask": name, "backend": backend,
                       "step_ms": round(statistics.median(seconds[2:]) * 1e3, 1),
                       "vs_dense": round(dense / statistics.median(seconds[2:]), 3),
                       "mask_calls": dict(seen)}
                print(row, flush=True)
                rows.append(row)
with open(os.path.join(os.environ.get("OUT", "."), "mask-diag-h200.json"), "w") as handle:
    json.dump(rows, handle, indent=1)
