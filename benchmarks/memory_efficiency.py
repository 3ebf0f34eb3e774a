"""Peak memory and step time of the optimizer step fused into backward against standard backprop, for SGD
and Adam, each next to its analytic prediction (issue #6).

    python benchmarks/memory_efficiency.py [--hidden 768 --layers 10 --seq 32 --steps 4 --threads 1]

A tiny Llama scaled to ~70M parameters (batch 1, short sequence, so parameters dominate; no gradient
checkpointing, clipping for backprop as the Trainer's default), each variant run by the `memory-efficiency`
recipe's measuring function in a fresh process: on a GPU the peak is
`torch.cuda.max_memory_allocated`, on CPU the peak resident set size with glibc's mmap threshold fixed low.
The first step runs under the torch profiler (its live-tensor peak is printed as a second measurement),
the others are timed, and their peak is taken relative to the memory at their start, when exactly the
parameters and the optimizer state (measured) are live:

    measured  = parameters + optimizer state + (peak of the timed steps - memory at their start)
    predicted = P(2+s) + A             standard backprop: parameters, all gradients, states, activations
              = P(1+s) + A + G         fused: no full gradient set, only the largest single gradient G

with P the parameter bytes, s the optimizer states per parameter (SGD 0, Adam 2) and A the memory the
forward pass adds (measured). Goals: measured within 15% of predicted; fused step time at most 1.25x
standard. Ends with the line
RESULT sgd_saving=<x> adam_saving=<x> sgd_error=<x> adam_error=<x> time_ratio=<x>
(saving: measured fraction of the standard peak saved by fusing; error: the larger relative error of the
two methods; time_ratio: the larger fused/standard step-time ratio of the two optimizers).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from llmrepro.lm.models import default_device
from llmrepro.training import memory
from llmrepro.training.optimizers import STATE_TENSORS

VARIANTS = [("backprop", "sgd"), ("fused", "sgd"), ("backprop", "adam"), ("fused", "adam")]


def config(method: str, optimizer: str, args) -> dict:
    tiny_config = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3 // 64 * 64,
                   "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
                   "num_key_value_heads": args.hidden // 64}
    return {"model": {"name": "tiny-llama", "tiny_config": tiny_config},
            "data": {"name": "fixture:gair-lima", "format": "lima"}, "template": "llama-2-no-bos",
            "export_trace": False,
            "train": {"method": method, "optimizer": optimizer, "learning_rate": 1e-5, "max_length": args.seq,
                      "rows": args.steps, "profile_steps": 1, "max_grad_norm": 1.0 if method == "backprop" else 0,
                      "gradient_checkpointing": "off"}}


def predicted(m: dict, method: str, optimizer: str) -> float:
    p, s = m["trainable_param_mb"], STATE_TENSORS[optimizer]
    if method == "backprop":
        return p * (2 + s) + m["activation_mb"]
    return p * (1 + s) + m["activation_mb"] + m["largest_grad_mb"]


def measured(m: dict) -> float:
    return m["param_mb"] + m["optimizer_state_mb"] + m["timed_peak_mb"] - m["timed_start_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per measured process (OMP_NUM_THREADS); one is fastest on a shared machine")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the measuring processes

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for method, optimizer in VARIANTS:
            results[method, optimizer] = m = memory.in_fresh_process(
                "llmrepro.recipes.memory_efficiency:measure", {"config": config(method, optimizer, args), "out_dir": out})
            print(f"measured {method}+{optimizer} on {default_device()}", flush=True)

    m0 = results["backprop", "sgd"]
    print(f"\nmodel: {m0['param_mb']:.0f} MB of parameters, largest gradient {m0['largest_grad_mb']:.1f} MB, "
          f"activations {m0['activation_mb']:.1f} MB (batch 1, {args.seq} tokens)\n")
    print(f"{'variant':16} {'measured MB':>12} {'predicted MB':>13} {'error':>7} {'profiler MB':>12} {'error':>7} "
          f"{'step s':>8}")
    errors = {}
    for (method, optimizer), m in results.items():
        pred = predicted(m, method, optimizer)
        err, prof_err = measured(m) / pred - 1, m["timeline_peak_total_mb"] / pred - 1
        errors[method, optimizer] = err
        print(f"{method + '+' + optimizer:16} {measured(m):12.0f} {pred:13.0f} {err:+7.1%} "
              f"{m['timeline_peak_total_mb']:12.0f} {prof_err:+7.1%} {m['step_time_s']:8.3f}")

    summary = {}
    for optimizer in ("sgd", "adam"):
        std, fused = results["backprop", optimizer], results["fused", optimizer]
        saving = 1 - measured(fused) / measured(std)
        pred_saving = 1 - predicted(fused, "fused", optimizer) / predicted(std, "backprop", optimizer)
        ratio = fused["step_time_s"] / std["step_time_s"]
        print(f"{optimizer}: fused saves {saving:.1%} of the peak (predicted {pred_saving:.1%}); "
              f"step time fused/standard {ratio:.2f}x")
        summary[optimizer] = (saving, max(abs(errors["backprop", optimizer]), abs(errors["fused", optimizer])), ratio)
    print(f"RESULT sgd_saving={summary['sgd'][0]:.3f} adam_saving={summary['adam'][0]:.3f} "
          f"sgd_error={summary['sgd'][1]:.3f} adam_error={summary['adam'][1]:.3f} "
          f"time_ratio={max(summary['sgd'][2], summary['adam'][2]):.2f}")


if __name__ == "__main__":
    main()
