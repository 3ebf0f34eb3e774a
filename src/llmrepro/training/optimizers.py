"""Optimizers by name, the learning-rate schedules transformers knows, and what a fused step cannot do.

Importing this module needs no torch: configs validate optimizer and scheduler names and the fused step's
limits here, before any work.
"""

from __future__ import annotations

OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}  # name -> torch.optim class
STATE_TENSORS = {"sgd": 0, "adam": 2, "adamw": 2}  # parameter-sized state tensors (SGD without momentum)
# transformers' SchedulerType values (tests/training/test_optimizers.py checks this list against it)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


def optimizer_class(name: str):
    import torch

    return getattr(torch.optim, OPTIMIZERS[name])


class UnsupportedError(ValueError):
    """A training setup that a fused optimizer step cannot honour."""


def unsupported(*, gradient_accumulation_steps: int = 1, max_grad_norm: float | None = None,
                grad_scaling: bool = False, distributed: bool = False) -> str | None:
    """Why the fused step cannot do this training setup (one line), or None if it can."""
    if gradient_accumulation_steps > 1:
        return (f"the fused optimizer step cannot accumulate gradients (gradient_accumulation_steps="
                f"{gradient_accumulation_steps}): it steps during every backward; use method backprop or 1 step")
    if max_grad_norm:
        return ("the fused optimizer step cannot clip gradients (max_grad_norm set): the global norm needs all "
                "gradients before any step; use method backprop or unset max_grad_norm")
    if grad_scaling:
        return ("the fused optimizer step cannot use mixed-precision grad scaling (fp16): the scaler must check all "
                "gradients for inf/NaN before stepping; use bf16, float32, or method backprop")
    if distributed:
        return ("the fused optimizer step cannot run under distributed data parallel: it would step before the "
                "gradient all-reduce; run on one process or use method backprop")
    return None
