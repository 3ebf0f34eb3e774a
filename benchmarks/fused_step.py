"""The optimizer step fused into backward without per-parameter overhead (issue 15, item 4): step time of the
bucketed fused step against the standard step with Adam, on the DTU thesis' small 3-layer net and on a 10M+
parameter LM, and the LM's peak memory against its analytic prediction.

    python benchmarks/fused_step.py [--hidden 512 --layers 8 --seq 128 --steps 4 --repeats 15 --threads 1]

Variants, timed interleaved in one run (each repeat runs every variant once, in rotating order; a variant's
figure is its best time over the repeats relative to the standard step's best, with the median of the
per-repeat ratios printed next to it):
- standard: `torch.optim.Adam`, stepped after backward (torch's default implementation: foreach on CUDA,
  a loop over tensors on CPU).
- per-parameter: `FusedOptimizer(buckets=None)`, one Adam per tensor stepped in its post-accumulate-grad
  hook: the thesis' MotherOptimizer, kept for the reproduction experiments.
- bucketed: `FusedOptimizer(buckets=...)`, one Adam per bucket, one multi-tensor call when the bucket's last
  gradient has accumulated, its gradients freed then. The buckets are `size_buckets`: like
  DistributedDataParallel's, at most `--bucket-mb` (25) MB of gradients each, in reverse parameter order, so
  the small net is one bucket and the LM gets about two decoder layers per bucket. Each bucket keeps one
  hook once the order of its gradients is known.
- per-layer: one bucket per decoder layer (`layer_buckets`; embeddings, norm and head in their own).

Small net: `backprop_trick.py`'s net (Linear(50,50)-ReLU-Linear(50,50)-ReLU-Linear(50,1)), its two param groups
and betas, a fresh x (5, 50), y (5, 1) every iteration; `--iterations` iterations per measurement.
LM: a tiny Llama scaled to `--hidden`/`--layers` (26M parameters by default), batch 1, `--seq` tokens of
random ids; `--steps` steps per measurement after one warm-up step (so Adam's states exist).

Memory (LM, Adam, after warm-up): the peak of live tensor bytes over one step, from the torch profiler's
memory timeline on CPU (the thesis' instrument; resident memory overstates live tensors, see
../shared/MEASURING.md) or `torch.cuda.max_memory_allocated` on a GPU, against
    predicted = P(1+s) + G_bucket + A      bucketed fused: parameters and states, the largest bucket's gradients
              = P(2+s) + A                 standard: every gradient at once
with P the parameter bytes, s = 2 Adam states, A the activations (the live bytes a forward pass adds,
measured the same way). memory_error = measured / predicted - 1 of the bucketed step. (The standard step's
prediction is an upper bound: activations are freed during backward while the gradients grow.)
Goals: both time ratios at most 1.05, |memory_error| at most 0.15. Ends with
RESULT small_net_time_ratio=<x> llm_time_ratio=<x> memory_error=<x>
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmrepro.lm.models import ModelConfig, load_model
from llmrepro.training import memory
from llmrepro.training.fused_optimizer import FusedOptimizer, layer_buckets, size_buckets

MB = 2**20
VARIANTS = ("standard", "per-parameter", "per-layer", "bucketed")


def small_net_setup(variant: str):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.ReLU(), torch.nn.Linear(50, 50), torch.nn.ReLU(),
                              torch.nn.Linear(50, 1))
    p = list(net.parameters())
    groups = [{"params": p[:4], "lr": 0.1, "betas": (0.9, 0.999)}, {"params": p[4:], "lr": 0.01, "betas": (0.1, 0.12)}]
    if variant == "standard":
        return net, torch.optim.Adam(groups, lr=1e-3)
    buckets = {"per-parameter": None, "per-layer": layer_buckets(net), "bucketed": size_buckets(p)}[variant]
    return net, FusedOptimizer(groups, torch.optim.Adam, buckets=buckets, lr=1e-3)


def small_net_time(net, opt, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        x, y = torch.randn(5, 50), torch.randn(5, 1)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        net.zero_grad()
    return (time.perf_counter() - start) / iterations


def lm_setup(variant: str, args):
    cfg = ModelConfig(name="tiny-llama", tiny_config={
        "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3 // 64 * 64,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64})
    model = load_model(cfg).to(args.device)
    model.train()
    if variant == "standard":
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    else:
        buckets = {"per-parameter": None, "per-layer": layer_buckets(model),
                   "bucketed": size_buckets(model.parameters(), args.bucket_mb)}[variant]
        opt = FusedOptimizer(model.parameters(), torch.optim.Adam, buckets=buckets, lr=1e-5)
    return model, opt


def lm_step(model, opt, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def lm_time(model, opt, batches, device: str) -> float:
    start = time.perf_counter()
    for ids in batches:
        lm_step(model, opt, ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def live_peak(fn, device: str) -> tuple[float, float]:
    """(peak live tensor MB while `fn` runs, the part of it that is neither parameters nor optimizer state): the
    CUDA allocator's peak, or on CPU the torch profiler's memory timeline (by category)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / MB
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / MB
        return peak, peak - before
    with memory.profiler() as prof:
        fn()
    _, by_category = memory.timeline(prof)
    at_peak = memory.peak_breakdown(by_category)
    return at_peak["total"], at_peak["total"] - at_peak.get("parameter", 0) - at_peak.get("optimizer_state", 0)


def interleaved(setups: dict, measure, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per variant: (best time, best time / the standard's best, median over repeats of the time relative to the
    standard's in the same repeat). Variants run in rotating order in each repeat. On a shared machine other
    processes only ever add time, so the best of many short measurements is the steadiest estimate (timeit's
    advice); the paired median is printed next to it."""
    seconds: dict[str, list[float]] = {v: [] for v in setups}
    for r in range(repeats):
        names = list(setups)[r % len(setups):] + list(setups)[:r % len(setups)]  # rotate the order
        for v in names:
            seconds[v].append(measure(*setups[v]))
    best = {v: min(t) for v, t in seconds.items()}
    return {v: (best[v], best[v] / best["standard"],
                statistics.median(a / b for a, b in zip(seconds[v], seconds["standard"], strict=True)))
            for v in setups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="LM steps per measurement")
    ap.add_argument("--iterations", type=int, default=200, help="small-net iterations per measurement")
    ap.add_argument("--repeats", type=int, default=15, help="LM measurements per variant (the small net: 3x as many)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="bucketed: gradient MB per bucket (DDP's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is steadiest on a shared machine)")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)

    # --- the small net ------------------------------------------------------------------------------------
    small = {v: small_net_setup(v) for v in VARIANTS}
    for net, opt in small.values():  # warm-up: Adam states, allocator, caches
        small_net_time(net, opt, 50)
    small_t = interleaved(small, lambda net, opt: small_net_time(net, opt, args.iterations), 3 * args.repeats)

    # --- the LM -------------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 1000, (1, args.seq), generator=gen).to(args.device) for _ in range(args.steps)]
    lm = {v: lm_setup(v, args) for v in VARIANTS}
    for model, opt in lm.values():
        lm_step(model, opt, batches[0])
    lm_t = interleaved(lm, lambda model, opt: lm_time(model, opt, batches, args.device), args.repeats)

    model, opt = lm["bucketed"]
    params = list(model.parameters())
    p_mb = sum(p.numel() * p.element_size() for p in params) / MB
    states_mb = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0) / MB
    forward_mb = live_peak(lambda: model(input_ids=batches[0], labels=batches[0]), args.device)[1]
    measured = {v: live_peak(lambda v=v: lm_step(*lm[v], batches[0]), args.device)[0] for v in VARIANTS}
    bucket_mb = opt.largest_bucket_bytes / MB
    largest = {v: lm[v][1].largest_bucket_bytes / MB for v in VARIANTS[1:]}
    predicted = {"standard": p_mb + p_mb + states_mb + forward_mb,
                 **{v: p_mb + states_mb + largest[v] + forward_mb for v in VARIANTS[1:]}}

    print(f"device {args.device}, {args.threads} thread(s); LM: {sum(p.numel() for p in params) / 1e6:.1f}M parameters "
          f"({p_mb:.0f} MB), Adam states {states_mb:.0f} MB, {len(opt.optimizers)} buckets of at most "
          f"{args.bucket_mb:g} MB (largest {bucket_mb:.1f} MB), "
          f"activations {forward_mb:.1f} MB (batch 1, {args.seq} tokens)\n")
    print(f"{'variant':15} {'small net s/it':>15} {'vs standard':>12} {'(paired median)':>16} {'LM s/step':>10} "
          f"{'vs standard':>12} {'(paired median)':>16}")
    for v in VARIANTS:
        print(f"{v:15} {small_t[v][0]:15.6f} {small_t[v][1]:11.3f}x {small_t[v][2]:15.3f}x {lm_t[v][0]:10.3f} "
              f"{lm_t[v][1]:11.3f}x {lm_t[v][2]:15.3f}x")
    print(f"\n{'LM peak memory':15} {'measured MB':>12} {'predicted MB':>13} {'error':>7}")
    for v in VARIANTS:
        print(f"{v:15} {measured[v]:12.1f} {predicted[v]:13.1f} {measured[v] / predicted[v] - 1:+7.1%}"
              + (f"  (largest bucket {largest[v]:.1f} MB)" if v in largest else ""))
    error = measured["bucketed"] / predicted["bucketed"] - 1
    print(f"RESULT small_net_time_ratio={small_t['bucketed'][1]:.3f} llm_time_ratio={lm_t['bucketed'][1]:.3f} "
          f"memory_error={error:.3f}")


if __name__ == "__main__":
    main()
