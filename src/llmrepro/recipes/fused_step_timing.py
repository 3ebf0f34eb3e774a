"""fused-step-timing: time per training iteration of a small dense net, standard optimizer vs the step fused
into backward, with bootstrap 95% confidence intervals.

Reproduces the DTU thesis' timing experiment: Linear(50,50)-ReLU-Linear(50,50)-ReLU-Linear(50,1), MSE loss,
x ~ N(0,1) of shape (5,50), 1000 iterations, two parameter groups (the first layer, the rest) with
different learning rates and betas, timed `repeats` times per method. Both methods start from the same
weights and data, so the run also checks that they end with the same parameters (`max_param_diff`).

The intervals are `scipy.stats.bootstrap` (BCa) over the repeats: of each method's mean seconds per
iteration, and of the paired ratio fused / standard. Methods alternate in order across repeats so that
drifting machine load does not favour one. The net is timed on `threads` CPU threads (default 1): at
this size, intra-op threads only add synchronisation, which on a busy machine dominates the time.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, field_validator

from llmrepro.core.config import RecipeConfig, Strict
from llmrepro.training.optimizers import optimizer_class


class GroupConfig(Strict):
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW only


class Config(RecipeConfig):
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    groups: list[GroupConfig] = [GroupConfig(lr=1e-3), GroupConfig(lr=1e-2, betas=(0.8, 0.99))]
    width: int = Field(50, ge=1)
    batch_size: int = Field(5, ge=1)
    iterations: int = Field(1000, ge=1)
    repeats: int = Field(10, ge=2)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    threads: int = Field(1, ge=1)  # torch intra-op threads while timing

    @field_validator("groups")
    @classmethod
    def _two_groups(cls, v: list[GroupConfig]) -> list[GroupConfig]:
        if len(v) != 2:
            raise ValueError("give two parameter groups: the first layer's, then the other layers'")
        return v


def build_net(width: int, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 1))


def param_groups(net, cfg: Config) -> list[dict]:
    params = list(net.parameters())
    split = [params[:2], params[2:]]  # first Linear (weight, bias), the rest
    extra = (lambda g: {"betas": g.betas}) if cfg.optimizer != "sgd" else (lambda g: {})
    return [{"params": ps, "lr": g.lr, **extra(g)} for ps, g in zip(split, cfg.groups, strict=True)]


def train(cfg: Config, fused: bool, x, y) -> tuple[float, list]:
    """(seconds per iteration, final parameters) of `iterations` steps from the seeded initial weights."""
    import torch

    from llmrepro.training.fused_optimizer import FusedOptimizer

    net = build_net(cfg.width, cfg.seed)
    cls = optimizer_class(cfg.optimizer)
    opt = FusedOptimizer(param_groups(net, cfg), cls) if fused else cls(param_groups(net, cfg))
    start = time.perf_counter()
    for _ in range(cfg.iterations):
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / cfg.iterations, [p.detach() for p in net.parameters()]


def run(cfg: Config, ctx) -> dict:
    import numpy as np
    import torch
    from scipy.stats import bootstrap

    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.width, generator=gen)
    y = torch.randn(cfg.batch_size, 1, generator=gen)
    times = {False: [], True: []}
    diff, threads = 0.0, torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        for r in ctx.progress(range(cfg.repeats), desc="repeats", total=cfg.repeats):
            finals = {}
            for fused in ((False, True) if r % 2 == 0 else (True, False)):
                seconds, finals[fused] = train(cfg, fused, x, y)
                times[fused].append(seconds)
            diff = max(diff, max((a - b).abs().max().item() for a, b in zip(finals[False], finals[True], strict=True)))
    finally:
        torch.set_num_threads(threads)

    standard, fused = np.array(times[False]), np.array(times[True])
    boot = dict(confidence_level=cfg.confidence_level, random_state=cfg.seed)
    metrics = {"max_param_diff": diff, "repeats": cfg.repeats, "iterations": cfg.iterations}
    for name, sample in (("standard", standard), ("fused", fused)):
        ci = bootstrap((sample,), np.mean, **boot).confidence_interval
        metrics.update({f"{name}_time_s": float(sample.mean()), f"{name}_time_ci_low": float(ci.low),
                        f"{name}_time_ci_high": float(ci.high)})
    ratio = bootstrap((fused, standard), lambda f, s, axis=-1: f.mean(axis) / s.mean(axis), paired=True,
                      **boot).confidence_interval
    metrics.update({"time_ratio": float(fused.mean() / standard.mean()), "time_ratio_ci_low": float(ratio.low),
                    "time_ratio_ci_high": float(ratio.high)})
    ctx.log_metrics(metrics)
    return metrics
