"""A controllable recipe for testing the run machinery: writes an artifact, then fails, stops or succeeds."""

from __future__ import annotations

from typing import Literal

from llmrepro.errors import UserError
from llmrepro.recipes.base import RecipeConfig

NAME = "probe"
DESCRIPTION = "test recipe"
SUPPORTS_RESUME = True


class Config(RecipeConfig):
    value: float = 1.0
    outcome: Literal["ok", "crash", "interrupt", "bad-input"] = "ok"


def run(cfg: Config, ctx) -> dict:
    resumed = ctx.resume and (ctx.dir / "artifact.txt").exists()
    (ctx.dir / "artifact.txt").write_text(f"{cfg.value}\n")
    ctx.record_input("datasets", "probe-data", sha256="0" * 64)
    if cfg.outcome == "crash":
        raise RuntimeError("boom")
    if cfg.outcome == "interrupt":
        raise KeyboardInterrupt
    if cfg.outcome == "bad-input":
        raise UserError("probe: bad input")
    return {"value": cfg.value * 2, "resumed": int(resumed), "train_time_s": 0.1}
