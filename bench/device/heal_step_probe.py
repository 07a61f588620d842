"""Where a `consa heal` step's 0.27 s goes on the GPU, and whether CUDA graphs take it back (session 19 measured
0.27 s a step on an H200; the step's arithmetic is an estimated ~15 ms).

A randomly initialised model of SmolLM2-135M's shape (no weights to carry), the 0.75 vote's mask, random 1024-token
rows. Four arms from the same starting weights on the same rows: ``consa_cli.heal.heal_weights`` as `consa heal`
runs it (eager, sdpa), float32 and TF32; then the same step with the student's forward and backward captured as CUDA
graphs (as the search's ``--cuda-graphs`` does: ``torch.cuda.make_graphed_callables`` on a module returning the
logits; the loss, the clipping and AdamW stay eager) and the teacher's forward captured as one graph, float32 and
TF32. The graphed arms must reproduce the eager arms' KL step for step (the printed max relative difference); then
a profile of a few eager steps (top ops by host time, kernel launches per step, device-busy time).

On 2 CPU cores (session 20, a TorchDispatchMode count at 1024 tokens, docs/benchmarks.md "Healing speed") a heal
step of this model dispatched ~6,800 operators that are not views with AdamW's foreach (teacher forward ~1,050,
student forward and KL ~2,280, backward ~3,040; 750 matrix products; bench/heal_op_count.py): on a GPU each is a kernel launch behind
Python, autograd and the dispatcher, and ~40 us apiece would be the 0.27 s measured -- why graphs should pay.
Run on the GPU machine from the repository root::

    PYTHONPATH=src python3 bench/device/heal_step_probe.py

Prepared in sessions 19-20, run in session 22 (docs/benchmarks.md "Healing speed"; its own graphed step then, now `consa heal`'s, heal_weights(cuda_graphs=True)); it needs no carry.
"""

import copy
import json
import math

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from consa_cli.allocation import Allocation
from consa_cli.calibration import CalibrationSet
from consa_cli.heal import heal_weights
from consa_cli.settings import HealSettings

STEPS, TIMED_FROM = 40, 10


config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().float()
teacher = copy.deepcopy(base).eval()  # its own config: install_hybrid switches the student's attention by config
for param in teacher.parameters():
    param.requires_grad_(False)
mask = Allocation.load("docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors")
rows = CalibrationSet.text_only(torch.randint(0, 49152, (64, 1024), generator=torch.Generator().manual_seed(0)))
settings = HealSettings(steps=STEPS, lr=5e-5)
results, kls = {}, {}
for graphs in (False, True):
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        arm = f"{'graphs' if graphs else 'eager'}-{'tf32' if tf32 else 'fp32'}"
        model = copy.deepcopy(base)
        try:
            # the graphed arm is consa heal's own (heal_weights' cuda_graphs, session 22)
            log = heal_weights(model, teacher, mask, rows, settings, "sdpa", cuda_graphs=graphs)
        except Exception as error:  # one failing arm must not cost the others' numbers
            print(arm, "failed:", type(error).__name__, str(error)[:300], flush=True)
            continue
        torch.cuda.synchronize()
        per_step = (log[-1]["seconds"] - log[TIMED_FROM - 1]["seconds"]) / (STEPS - TIMED_FROM)
        results[arm], kls[arm] = round(per_step, 4), [entry["kl"] for entry in log]
        print(arm, f"{per_step * 1000:.1f} ms/step (steps {TIMED_FROM}-{STEPS - 1}); KL step 0 / last:",
              kls[arm][0], kls[arm][-1], flush=True)
        del model
torch.backends.cuda.matmul.allow_tf32 = False
agreement = {}
for precision in ("fp32", "tf32"):
    eager, graphed = kls.get(f"eager-{precision}"), kls.get(f"graphs-{precision}")
    if eager and graphed:
        agreement[precision] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, graphed, strict=True))
        print(f"graphs vs eager, {precision}: max relative KL difference over {STEPS} steps", agreement[precision])

# The profile of the eager step: host time by op, and kernels launched per step.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

model = copy.deepcopy(base)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    heal_weights(model, teacher, mask, rows, HealSettings(steps=5, lr=1e-6), "sdpa")
    torch.cuda.synchronize()
events = prof.key_averages()
print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
device_ms = sum(e.self_device_time_total for e in events) / 1000
print(json.dumps({"ms_per_step": results, "graphs_vs_eager_max_relative_kl": agreement,
                  "cuda_kernels_per_step": kernels / 5, "device_busy_ms_per_step": round(device_ms / 5, 1),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "finite": all(math.isfinite(k) for arm in kls.values() for k in arm)}))
