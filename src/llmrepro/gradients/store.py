"""The gradient store as other recipes read it: every per-sample gradient of a finished extract-gradients run.

    dep = ctx.require(cfg.train, "extract-gradients")
    grads, params, meta = store.load(dep.path)    # (N, D), the run's params, its extraction.json
"""

from __future__ import annotations

from pathlib import Path

from llmrepro.core import io
from llmrepro.core.errors import UserError
from llmrepro.gradients import shards


def load(run_dir: Path):
    """(all stored per-sample gradients (N, D), the run's params, its extraction.json) of a `store` run."""
    import yaml

    metas = list((run_dir / "gradients").glob("**/extraction.json"))
    if len(metas) != 1:
        raise UserError(f"{run_dir}: expected one gradient directory, found {len(metas)}")
    meta = io.read_json(metas[0])
    if meta["mode"] != "store":
        raise UserError(f"{run_dir}: stores only the mean gradient (mode store_mean); per-sample gradients are needed")
    grads = shards.load_all(metas[0].parent, meta["samples"], meta["gradients_per_file"])
    return grads, yaml.safe_load((run_dir / "config.yaml").read_text())["params"], meta
