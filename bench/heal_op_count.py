"""How many operators one `consa heal` step dispatches, by phase (docs/benchmarks.md "Healing speed").

On a GPU every operator that is not a view is a kernel launch, and an eager step that launches thousands of small
kernels is bound by the host. This counts them on any device (the CPU is enough): a randomly initialised model of
SmolLM2-135M's shape (the vocabulary cut to ``--vocab`` to keep it quick: the count does not depend on it), the 0.75
vote's mask, ``consa_cli.heal.heal_weights`` for two steps under a ``TorchDispatchMode``, each operator filed under
the line of ``heal_weights`` it ran beneath (teacher forward, student forward + KL, backward, AdamW), with AdamW's
``foreach`` off and on (CUDA's default is on). Per-step numbers are the two steps' counts halved (the first step's
AdamW also creates its state)::

    PYTHONPATH=src python bench/heal_op_count.py
"""

from __future__ import annotations

import argparse
import collections
import copy
import inspect
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from consa_cli import heal as heal_module
from consa_cli.allocation import Allocation
from consa_cli.calibration import CalibrationSet
from consa_cli.heal import heal_weights
from consa_cli.settings import HealSettings

VIEWS = {"view", "_unsafe_view", "t", "transpose", "as_strided", "expand", "slice", "select", "unsqueeze", "permute",
         "reshape", "alias", "detach", "squeeze", "split", "unbind"}
PHASES = {"teacher(": "teacher forward", "kl_to_teacher(": "student forward + KL", "backward(": "backward",
          "optimizer.step(": "AdamW", "clip_grad_norm_(": "clipping"}


def phase_of_line() -> dict[int, str]:
    """heal_weights' source line numbers -> the phase their statement is."""
    lines, start = inspect.getsourcelines(heal_weights)
    return {start + offset: phase for offset, text in enumerate(lines)
            for marker, phase in PHASES.items() if marker in text}


class CountByPhase(TorchDispatchMode):
    def __init__(self, phases: dict[int, str]):
        super().__init__()
        self.phases, self.counts, self.matmuls = phases, collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            lines = [frame.lineno for frame in traceback.extract_stack() if frame.filename == heal_module.__file__]
            self.counts[self.phases.get(lines[-1], "other") if lines else "other"] += 1
            self.matmuls += name in ("mm", "bmm", "addmm")
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--mask", default="docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    teacher = copy.deepcopy(model).eval()
    mask = Allocation.load(args.mask)
    rows = CalibrationSet.text_only(torch.randint(0, args.vocab, (4, args.seq_len)))
    adamw = torch.optim.AdamW
    print(f"| AdamW foreach | {' | '.join(PHASES.values())} | other | total | matrix products |")
    print("|---|" + "---:|" * (len(PHASES) + 3))
    try:
        for foreach in (False, True):
            heal_module.torch.optim.AdamW = lambda params, foreach=foreach, **kw: adamw(params, foreach=foreach, **kw)
            mode = CountByPhase(phase_of_line())
            with mode:
                heal_weights(model, teacher, mask, rows, HealSettings(steps=2, lr=1e-6), "sdpa")
            cells = [mode.counts[phase] / 2 for phase in [*PHASES.values(), "other"]]
            print(f"| {foreach} | " + " | ".join(f"{cell:,.0f}" for cell in cells)
                  + f" | {sum(cells):,.0f} | {mode.matmuls / 2:,.0f} |", flush=True)
    finally:
        heal_module.torch.optim.AdamW = adamw


if __name__ == "__main__":
    main()
