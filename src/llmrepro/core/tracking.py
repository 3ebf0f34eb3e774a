"""Optional Weights & Biases tracking: off unless the config says `tracking: wandb` or WANDB_API_KEY is set.

`WANDB_MODE=offline` works as usual (runs are written under the run directory and synced later).
No experiment needs an account.
"""

from __future__ import annotations

import os

_run = None


def wanted(cfg) -> bool:
    return cfg.tracking == "wandb" or (cfg.tracking is None and bool(os.environ.get("WANDB_API_KEY")))


def start(cfg, spec, run_id: str, run_dir) -> dict | None:
    """Start a wandb run for this llmrepro run; returns what the manifest records about it."""
    global _run
    if not wanted(cfg):
        return None
    import wandb

    _run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llmrepro"), name=f"{spec.experiment}/{run_id}",
                      dir=str(run_dir), config={"experiment": spec.experiment, "recipe": spec.recipe,
                                                 "profile": spec.profile, **spec.params}, reinit="finish_previous")
    return {"backend": "wandb", "run_id": _run.id, "project": _run.project, "mode": os.environ.get("WANDB_MODE", "online")}


def log(metrics: dict, step: int | None = None) -> None:
    if _run is not None:
        _run.log(metrics, step=step)


def finish() -> None:
    global _run
    if _run is not None:
        _run.finish()
        _run = None
