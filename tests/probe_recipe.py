"""A controllable recipe for testing the run machinery: writes an artifact, then fails, stops, waits or succeeds."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Literal

from llmrepro.core import registry
from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError

RECORD = registry.Recipe("probe", "probe_recipe", "test recipe", supports_resume=True, depends_on=("probe",))


@contextlib.contextmanager
def registered():
    registry.register(RECORD)
    try:
        yield RECORD
    finally:
        registry.unregister(RECORD.name)


class Config(RecipeConfig):
    value: float = 1.0
    outcome: Literal["ok", "crash", "interrupt", "bad-input"] = "ok"
    sleep_s: float = 0.0  # hold the run (and its lock) this long, after writing `started` in its directory
    reads: RunRef | None = None  # another probe run whose metrics this one reads


def run(cfg: Config, ctx) -> dict:
    if cfg.sleep_s:
        (ctx.dir / "started").write_text("")
        time.sleep(cfg.sleep_s)
    if cfg.reads is not None:
        read = ctx.require(cfg.reads, "probe")
        cfg = cfg.model_copy(update={"value": cfg.value + float(Path(read.path / "artifact.txt").read_text())})
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
