"""fused-step-timing: the DTU thesis' timing of the fused optimizer step on a small dense net, as the `__main__`
block of `src/backprop_trick.py` ran it (MikkelGodsk/Masters-thesis @ b51c7f1, jobscript
`jobscripts/memory_efficiency/backprop_trick_time_small_ann.sh`, a V100).

The net is `dense_1 = Linear(50, 50)`, `dense_2 = Linear(50, 50)`, `dense_3 = Linear(50, 1)` with ReLU between,
MSE loss. Two nets are built one after the other (independent initial weights), each with the same two param
groups: dense_1 + dense_2 at lr 0.1, betas (0.9, 0.999), and dense_3 at lr 0.01, betas (0.1, 0.12); the
standard one gets `torch.optim.Adam(groups, lr=1e-3)`, the other `MotherOptimizer(groups, Adam, lr=1e-3)`
(the groups' lr win). An iteration draws a fresh x ~ N(0, 1) of shape (5, 50) and y of shape (5, 1) on the
CPU, moves them to the device, and runs forward, backward, `optimizer.step()`, `net.zero_grad()`.
`timeit.repeat(number=10, repeat=10)` of 1000 iterations: 10 measurements of 10,000 iterations each, without
re-initialising anything, the standard optimizer timed completely first. Reported: the mean and the sample
standard deviation of the 10 totals per method, here also their ratio. The source's only figure is the
comment "The backprop trick seems to take approx 70% longer than the other method".

Deliberate differences from the source:
- Seeded (`seed`, once before building the nets); the source was not.
- CPU when there is no GPU (the source called `.cuda()` unconditionally); on CUDA the measured region ends
  with a synchronisation (the jobscript's CUDA_LAUNCH_BLOCKING=1 made every launch synchronous; set it in the
  environment to reproduce that).
- The fused optimizer's own `step()` (a no-op here: the steps run in backward) is not wrapped in torch's
  profiler `record_function`, which torch put around the source's no-op `MotherOptimizer.step` (some 10 us
  per iteration: part of the overhead the source measured, not of the per-parameter steps).
- Options: `fused_buckets: group` or `size` times the bucketed fused step (one Adam call per param group, or
  per 25 MB of gradients, i.e. one for this net, stepped when the bucket's last gradient has arrived) instead
  of the source's per-parameter one; `order: alternate` interleaves the methods' measurements against
  drifting machine load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmrepro.core.config import RecipeConfig, Strict


class GroupConfig(Strict):
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.999)


class Config(RecipeConfig):
    groups: tuple[GroupConfig, GroupConfig] = (GroupConfig(lr=0.1), GroupConfig(lr=0.01, betas=(0.1, 0.12)))
    default_lr: float = Field(1e-3, gt=0)  # the optimizers' lr argument, overridden by both groups' lr
    iterations: int = Field(1000, ge=1)  # per timed call (`timing(..., max_iter=1000)`)
    number: int = Field(10, ge=1)  # timeit.repeat(number=...)
    repeat: int = Field(10, ge=2)  # timeit.repeat(repeat=...)
    # parameter: the source's MotherOptimizer; size: buckets of <= 25 MB (this net: one bucket, one Adam call)
    fused_buckets: Literal["parameter", "group", "size"] = "parameter"
    order: Literal["source", "alternate"] = "source"  # source: all standard measurements, then all fused
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU; None: torch's default


def build_net():
    """The source's `ANN`: dense_1, dense_2, dense_3 with ReLU between (no output activation)."""
    import torch
    from torch import nn

    class ANN(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_1, self.dense_2, self.dense_3 = nn.Linear(50, 50), nn.Linear(50, 50), nn.Linear(50, 1)

        def forward(self, x):  # (B, 50) -> (B, 1)
            return self.dense_3(torch.relu(self.dense_2(torch.relu(self.dense_1(x)))))

    return ANN()


def param_groups(net, cfg: Config) -> list[dict]:
    first, second = cfg.groups
    return [{"params": [*net.dense_1.parameters(), *net.dense_2.parameters()], "lr": first.lr, "betas": first.betas},
            {"params": list(net.dense_3.parameters()), "lr": second.lr, "betas": second.betas}]


def optimizers(cfg: Config, device: str):
    """(net, optimizer) of the standard and the fused method, built in the source's order."""
    import torch

    from llmrepro.training.fused_optimizer import FusedOptimizer, size_buckets

    standard_net, fused_net = build_net().to(device), build_net().to(device)
    standard = torch.optim.Adam(param_groups(standard_net, cfg), lr=cfg.default_lr)
    buckets = {"parameter": None, "group": "group", "size": size_buckets(fused_net.parameters())}[cfg.fused_buckets]
    fused = FusedOptimizer(param_groups(fused_net, cfg), torch.optim.Adam, buckets=buckets, lr=cfg.default_lr)
    return {"standard": (standard_net, standard), "fused": (fused_net, fused)}


def timing(net, optimizer, iterations: int, device: str) -> None:
    """The source's `timing`: fresh data every iteration, drawn on the CPU and moved to the device."""
    import torch

    loss_fn = torch.nn.MSELoss()
    for _ in range(iterations):
        x, y = torch.randn((5, 50)).to(device), torch.randn([5, 1]).to(device)
        loss_fn(net(x), y).backward()
        optimizer.step()
        net.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()


def run(cfg: Config, ctx) -> dict:
    import functools
    import json
    import statistics
    import timeit

    import torch

    from llmrepro.lm.models import default_device

    device = default_device() if cfg.device == "auto" else cfg.device
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    setups = optimizers(cfg, device)
    times: dict[str, list[float]] = {"standard": [], "fused": []}
    try:
        calls = {name: functools.partial(timing, net, opt, cfg.iterations, device)
                 for name, (net, opt) in setups.items()}
        if cfg.order == "source":  # timeit.repeat per method, standard first
            for name, call in calls.items():
                times[name] = timeit.repeat(call, number=cfg.number, repeat=cfg.repeat)
        else:
            for r in ctx.progress(range(cfg.repeat), desc="repeats", total=cfg.repeat):
                for name in (("standard", "fused") if r % 2 == 0 else ("fused", "standard")):
                    times[name] += timeit.repeat(calls[name], number=cfg.number, repeat=1)
    finally:
        torch.set_num_threads(threads)
    metrics = {"device": device, "iterations_per_measurement": cfg.number * cfg.iterations,
               "measurements": cfg.repeat}
    for name, sample in times.items():  # seconds per `number` x `iterations` iterations, as the source printed
        metrics[f"{name}_time_s"] = statistics.mean(sample)
        metrics[f"{name}_time_stdev_s"] = statistics.stdev(sample)
    metrics["time_ratio"] = metrics["fused_time_s"] / metrics["standard_time_s"]
    (ctx.dir / "times.json").write_text(json.dumps(times))  # every measurement, seconds
    ctx.log_metrics(metrics)
    return metrics
