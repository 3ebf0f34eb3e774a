"""The gradient store as other recipes read it: every per-sample gradient of a finished extract-gradients run,
or of the source's own extraction files.

    dep = ctx.require(cfg.train, "extract-gradients")
    grads, params, meta = store.load(dep.path)    # (N, D), the run's params, its extraction.json
    _, params, meta = store.describe(dep.path)    # the same without reading the gradients
    grads = store.load_source(path)               # (N, D) from extract_gradients.py's `{start}_{end}` files
"""

from __future__ import annotations

from pathlib import Path

from llmrepro.core import io
from llmrepro.core.errors import UserError
from llmrepro.gradients import shards


def describe(run_dir: Path) -> tuple[Path, dict, dict]:
    """(gradient directory, the run's params, its extraction.json) of a `store` run, without reading gradients."""
    import yaml

    metas = list((run_dir / "gradients").glob("**/extraction.json"))
    if len(metas) != 1:
        raise UserError(f"{run_dir}: expected one gradient directory, found {len(metas)}")
    meta = io.read_json(metas[0])
    if meta["mode"] != "store":
        raise UserError(f"{run_dir}: stores only the mean gradient (mode store_mean); per-sample gradients are needed")
    return metas[0].parent, yaml.safe_load((run_dir / "config.yaml").read_text())["params"], meta


def load(run_dir: Path):
    """(all stored per-sample gradients (N, D), the run's params, its extraction.json) of a `store` run."""
    directory, params, meta = describe(run_dir)
    return shards.load_all(directory, meta["samples"], meta["gradients_per_file"]), params, meta


def load_source(path: str | Path):
    """(N, D) gradients the source's extract_gradients.py stored: a `{start}_{end}` file or its directory."""
    return shards.read_source(Path(path).expanduser())
