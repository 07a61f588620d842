"""The search step with its gated forward and backward replayed as CUDA graphs: a prototype for issue 4.

At 4096 tokens the search step's kernels take 0.83x of the dense step's kernel time, yet the step runs at
0.5-0.8x dense, because the device idles half of every step waiting for the host to launch work
(docs/benchmarks.md, session 12: ``search_speed.py --device-busy``). torch.compile's reduce-overhead mode made the
step 6x slower. This prototype captures the step by hand, split at the relaxed weights:

* a static leaf ``fa_weights [L, H]`` (a parameter of :class:`GatedLogits`, the only one that needs a gradient)
  holds this step's relaxed weights, copied in from the gate sample;
* the gated model's logits as a function of ``input_ids`` (and that leaf) are captured with
  ``torch.cuda.make_graphed_callables``: one graph for the forward, one for the backward;
* the loss stays eager (its chunks are compiled), and the gradient the backward leaves on the leaf is sent on
  through the gate sample to ``log_alpha`` (``weights.backward(leaf.grad)``).

By the chain rule that is the gradient of the search's single backward; ``tests/test_search.py`` checks the split
on the CPU (:func:`split_step` against :func:`plain_step`), and on CUDA this script checks the graphed step against
the eager split step before timing. Timed per round, in the same process: the dense step (as ``search_speed.py``),
the plain search step, the eager split step and the graphed split step; LM loss, one sequence per step, flex.

    python bench/graph_step.py --lengths 4096 8192 --rounds 2 --json docs/results/graph-step-h200.json

Run in session 13 on an H200 (docs/benchmarks.md, session 13): the graphs capture once each layer's row of the
leaf is taken inside the forward; they took 7-10% off the 4096-token step and made the 8192-token step 2.4x slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from search_speed import QWEN3_0_6B, TINY, build_model, dense_step_seconds, failure, synchronize

from consa_cli.attention import install_hybrid, remove_hybrid, set_fa_weights
from consa_cli.losses import next_token_loss
from consa_cli.search import (
    GatedLogits,
    HardConcreteGates,
    UnitLayout,
    environment_versions,
    resolve_attention_backend,
)


def plain_step(model, gates, layout, input_ids, generator) -> torch.Tensor:
    """The search's step (LM loss): one backward from the loss to ``log_alpha``; returns the loss."""
    weights = layout.to_fa_weights(gates.sample(generator))
    set_fa_weights(model, weights)
    loss = next_token_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)
    loss.backward()
    return loss.detach()


def split_step(gated: GatedLogits, forward, gates, layout, input_ids, generator) -> torch.Tensor:
    """The same step split at the relaxed weights: ``forward`` (``gated`` or its graphed version) gives the logits,
    the loss's backward leaves d loss / d weights on ``gated.fa_weights``, then it goes on to ``log_alpha``."""
    weights = layout.to_fa_weights(gates.sample(generator))
    with torch.no_grad():
        gated.fa_weights.copy_(weights)
    gated.fa_weights.grad = None
    loss = next_token_loss(forward(input_ids), input_ids)
    loss.backward()
    weights.backward(gated.fa_weights.grad)
    return loss.detach()


def timed(step, device, warmup: int, repeats: int) -> list[float]:
    seconds = []
    for _ in range(warmup + repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[warmup:]


def profile_table(step, steps: int, rows: int = 25) -> str:
    """The device kernels of ``steps`` steps (after one untimed), by total device time: what a graphed step runs
    differently from the eager one (kernels inside a CUDA graph replay show up individually under CUPTI)."""
    step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def measure(model, layout: UnitLayout, length: int, backend: str, device: torch.device, args) -> dict:
    """One sequence length: the graphs' exactness against the eager split step, then the steps timed in rounds."""
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (1, length), device=device)
    row = {"tokens": length, "backend": backend}
    gates = HardConcreteGates(layout.num_units, -1.0, 2.0 / 3.0, -0.1, 1.1).to(device)  # gates partly open
    install_hybrid(model, torch.ones(layout.num_layers, layout.num_kv_heads, dtype=torch.bool), args.window,
                   args.sink_tokens, backend)
    try:
        # Two wrappers, each with its own leaf: make_graphed_callables replaces a module's forward by the graphs,
        # and the graphs read the leaf that was installed while they were captured.
        eager, graph_module = GatedLogits(model), None
        generator = torch.Generator().manual_seed(0)
        steps = {"plain": lambda: plain_step(model, gates, layout, input_ids, generator),
                 "split": lambda: split_step(eager, eager, gates, layout, input_ids, generator)}
        if device.type == "cuda":
            split_step(eager, eager, gates, layout, input_ids, generator)  # compile the kernels first
            # A forward or backward that waits for the device cannot be captured: find the first such wait.
            torch.cuda.set_sync_debug_mode("error")
            try:
                split_step(eager, eager, gates, layout, input_ids, generator)
                row["synchronizes"] = None
            except RuntimeError:
                row["synchronizes"] = traceback.format_exc(limit=-8)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            try:
                graph_module = GatedLogits(model)
                graphed = torch.cuda.make_graphed_callables(graph_module, (input_ids,))
                # Exact? The same gate sample through the eager and the graphed split step.
                results = []
                for wrapper in (eager, graph_module):
                    gates.log_alpha.grad = None
                    loss = split_step(wrapper, graphed if wrapper is graph_module else eager, gates, layout,
                                      input_ids, torch.Generator().manual_seed(1))
                    results.append((loss.item(), gates.log_alpha.grad.clone()))
                row["graphed_loss_difference"] = abs(results[0][0] - results[1][0])
                row["graphed_grad_max_difference"] = (results[0][1] - results[1][1]).abs().max().item()
                row["grad_max"] = results[0][1].abs().max().item()
                steps["graphed"] = lambda: split_step(graph_module, graphed, gates, layout, input_ids, generator)
            except Exception as error:  # noqa: BLE001 -- recorded: whether the capture works is the question
                row["graphed_failed"] = failure(error)
                row["graphed_traceback"] = traceback.format_exc(limit=-12)
        if args.profile and device.type == "cuda":
            row["profiles"] = {name: profile_table(steps[name], args.profile) for name in steps}
        seconds = {name: [] for name in ("dense", *steps)}
        for round_index in range(args.rounds):
            order = list(seconds) if round_index % 2 == 0 else list(seconds)[::-1]
            for name in order:
                if name == "dense":
                    remove_hybrid(model)
                    seconds[name] += dense_step_seconds(model, input_ids, args.warmup, args.repeats)[
                        args.warmup:]
                    install_hybrid(model, torch.ones(layout.num_layers, layout.num_kv_heads, dtype=torch.bool),
                                   args.window, args.sink_tokens, backend)
                    continue
                gates.log_alpha.grad = None
                seconds[name] += timed(steps[name], device, args.warmup, args.repeats)
        dense = statistics.median(seconds["dense"])
        for name, values in seconds.items():
            row[f"{name}_ms"] = round(1000 * statistics.median(values), 2)
            row[f"{name}_vs_dense"] = round(dense / statistics.median(values), 3)
    finally:
        remove_hybrid(model)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="every other round in reverse order")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of each kind before timing (the kernels' table in the JSON)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (on a CPU: no graphs, the rest runs)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(TINY if args.tiny else QWEN3_0_6B, device)
    config = model.config
    layout = UnitLayout("kv-head", config.num_hidden_layers, config.num_key_value_heads)
    report = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": environment_versions(), "window": args.window, "sink_tokens": args.sink_tokens,
              "rows": []}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    backend = resolve_attention_backend("auto", device, torch.bfloat16)
    for length in args.lengths:
        row = measure(model, layout, length, backend, device, args)
        report["rows"].append(row)
        print(row, flush=True)
        save()
        if "graphed_failed" in row:  # (a failed capture leaves the CUDA generator unusable in this process)
            break


if __name__ == "__main__":
    main()
