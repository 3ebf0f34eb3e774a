"""score-gradients: rank the training samples for every test sample by gradient similarity (dot or cosine).

Reproduces `explain.py` of the 'Gradient dimensionality reduction' project @ d73147d (run by `exp.sbatch`):
the influence estimate of train sample j on test sample i is <g_train_j, g_test_i> (`dot`) or their cosine,
and each test sample gets a JSON list of every train sample, best first, each with its dataset row (the
source's `--mapped yes`). With `ranking: source` (default) the scores and the order are explain.py's: the
stored dtype on the CPU (float16 for full gradients), Python's sort, which a NaN score (the cosine of an
all-zero float16 gradient) leaves partly unsorted; `ranking: fixed` scores in float32 and sorts by score.
See `llmrepro.gradients.ranking`.

Inputs: two finished extract-gradients runs (`train`, `test`), or the source's own files (`train_path`,
`test_path`: an (n, 1, D) `{start}_{end}` file of extract_gradients.py, or its directory; `data` then names
the train rows, as explain.py's `--dataset`).

Output: `scores/{dot|cosine}/test_{i}.json`, a list of {rank, index, score, **train row}, best first
(`top_k` of them, or all).

Deliberate differences from the source:
- files are `scores/{method}/test_{i}.json` (explain.py: `explainability/{D}/{where}/{method}/
  {dataset}_test_{i}.json`), and entries carry their `rank` and train `index` besides score and row;
- a NaN score is written as null (standard JSON; explain.py wrote the bare token NaN);
- every shard of a run is read (explain.py took one file per side);
- with runs, the train rows come from the train run's data config (explain.py loaded `--dataset` with split
  `train` whatever the extraction read);
- float16 sums are taken `chunk_rows` train rows at a time: the same operations, but torch splits a CPU
  reduction by shape and thread count, so a float16 score can differ from explain.py's in its last bit;
- `top_k` can cut the lists (default: all, as the source).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.gradients import store
from llmrepro.gradients.ranking import CHUNK_ROWS, Ranking, rank, score
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig


class Config(RecipeConfig):
    train: RunRef | None = None  # an extract-gradients run (mode store)
    test: RunRef | None = None
    train_path: str | None = None  # or the source's gradient files (then `data` gives the train rows)
    test_path: str | None = None
    data: DataConfig | None = None
    function: Literal["dot", "cosine", "both"] = "both"
    ranking: Ranking = "source"  # fixed: float32 scores, sorted by score
    top_k: int | None = Field(None, ge=1)  # none: every train sample, as the source
    chunk_rows: int = Field(CHUNK_ROWS, ge=1)  # train rows per float16 product (memory)

    @model_validator(mode="after")
    def _inputs(self):
        for side in ("train", "test"):
            if (getattr(self, side) is None) == (getattr(self, f"{side}_path") is None):
                raise ValueError(f"give either {side} (an extract-gradients run) or {side}_path (source files)")
        if self.train_path is not None and self.data is None:
            raise ValueError("train_path needs data: the dataset whose rows the train gradients belong to")
        return self


def gradients(cfg: Config, ctx, side: str):
    """(N, D) gradients and the train rows' data config (or None) of one side."""
    ref, path = getattr(cfg, side), getattr(cfg, f"{side}_path")
    if ref is None:
        return store.load_source(path), cfg.data
    grads, params, _ = store.load(ctx.require(ref, "extract-gradients").path)
    return grads, cfg.data or DataConfig.model_validate(params["data"])


def run(cfg: Config, ctx) -> dict:
    import numpy as np

    train, train_data = gradients(cfg, ctx, "train")
    test, _ = gradients(cfg, ctx, "test")
    if train.shape[1] != test.shape[1]:
        raise UserError(f"train gradients have dimension {train.shape[1]}, test gradients {test.shape[1]}: "
                        "extract both with the same model, max_length and projection")
    rows = data.load_rows(train_data, ctx)
    if len(rows) != len(train):
        raise UserError(f"{len(train)} train gradients but {len(rows)} rows in {train_data.name}: "
                        "give the dataset (and limit) the train gradients were extracted from")
    k = min(cfg.top_k or len(train), len(train))
    metrics = {"train_samples": len(train), "test_samples": len(test), "dim": train.shape[1]}
    for method in (["dot", "cosine"] if cfg.function == "both" else [cfg.function]):
        scores = score(test, train, method, cfg.ranking, cfg.chunk_rows)  # (M, N)
        orders = rank(scores, cfg.ranking)
        out = ctx.dir / "scores" / method
        out.mkdir(parents=True, exist_ok=True)
        for i in ctx.progress(range(len(test)), desc=f"{method} lists"):
            io.write_json(out / f"test_{i}.json", [{"rank": r, "index": j, "score": float(scores[i, j]), **rows[j]}
                                                   for r, j in enumerate(orders[i][:k])])
        metrics[f"{method}_top1_mean"] = float(np.nanmean([scores[i, o[0]] for i, o in enumerate(orders)]))
        metrics[f"{method}_nan_scores"] = int(np.isnan(scores).sum())
    ctx.log_metrics(metrics)
    return metrics
