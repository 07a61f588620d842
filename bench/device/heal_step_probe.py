"""Where a `consa heal` step's 0.27 s goes on the GPU (session 19 measured it; the arithmetic is ~15 ms).

A randomly initialised model of SmolLM2-135M's shape (no weights to carry), the 0.75 vote's mask, random 1024-token
rows: ``consa_cli.heal.heal_weights`` timed per step (sdpa, float32 and TF32), then a profile of a few steps (the top ops
by host time and the number of kernel launches per step). Run on the GPU machine from the repository root::

    PYTHONPATH=src python3 bench/device/heal_step_probe.py

Prepared in session 19, not run yet (no machine was lent for it); it needs no carry.
"""

import copy
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from consa_cli.allocation import Allocation
from consa_cli.calibration import CalibrationSet
from consa_cli.heal import heal_weights
from consa_cli.settings import HealSettings

config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().float()
teacher = copy.deepcopy(model).eval()  # its own config: install_hybrid switches the student's attention by config
mask = Allocation.load("docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors")
rows = CalibrationSet.text_only(torch.randint(0, 49152, (64, 1024), generator=torch.Generator().manual_seed(0)))
results = {}
for backend in ("sdpa",):  # flex: measured in docs/benchmarks.md, no faster after 50 s of compiling
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        log = heal_weights(model, teacher, mask, rows, HealSettings(steps=40, lr=1e-6), backend)
        torch.cuda.synchronize()
        per_step = (log[-1]["seconds"] - log[9]["seconds"]) / 30
        results[f"{backend}{'+tf32' if tf32 else ''}"] = round(per_step, 4)
        print(backend, "tf32" if tf32 else "fp32", f"{per_step * 1000:.1f} ms/step (steps 10-39)", flush=True)
torch.backends.cuda.matmul.allow_tf32 = False

# The profile: host time by op, and kernels launched per step.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    heal_weights(model, teacher, mask, rows, HealSettings(steps=5, lr=1e-6), "sdpa")
    torch.cuda.synchronize()
events = prof.key_averages()
print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
device_ms = sum(e.self_device_time_total for e in events) / 1000
print(json.dumps({"ms_per_step": results, "cuda_kernels_per_step": kernels / 5,
                  "device_busy_ms_per_step": round(device_ms / 5, 1), "gpu": torch.cuda.get_device_name()}))
