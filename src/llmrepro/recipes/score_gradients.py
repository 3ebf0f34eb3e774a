"""score-gradients: rank training samples for every test sample by gradient similarity (dot or cosine).

Reproduces `explain.py` of the 'Gradient dimensionality reduction' project: the influence estimate of train
sample j on test sample i is <g_train_j, g_test_i> (`dot`) or its cosine, and each test sample gets a JSON
file of the train samples sorted by score, each with its dataset row (the source's `--mapped yes`).

Output: `scores/{dot|cosine}/test_{i}.json`, a list of {rank, index, score, **train row}, best first
(`top_k` of them, or all). Gradients come from finished extract-gradients runs, named by experiment (run
first), or by run directory. Differences from the source: all shards of a run are read (the
source took one file); scores are computed as one matrix product per method.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.gradients import store
from llmrepro.gradients.similarity import score_matrix
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig


class Config(RecipeConfig):
    train: RunRef  # an extract-gradients run (mode store)
    test: RunRef
    function: Literal["dot", "cosine", "both"] = "both"
    top_k: int | None = Field(None, ge=1)  # none: every train sample, as the source


def run(cfg: Config, ctx) -> dict:
    train, train_params, _ = store.load(ctx.require(cfg.train, "extract-gradients").path)
    test, _, _ = store.load(ctx.require(cfg.test, "extract-gradients").path)
    if train.shape[1] != test.shape[1]:
        raise UserError(f"train gradients have dimension {train.shape[1]}, test gradients {test.shape[1]}: "
                        "extract both with the same model, max_length and projection")
    rows = data.load_rows(DataConfig.model_validate(train_params["data"]), ctx)
    k = min(cfg.top_k or len(train), len(train))
    metrics = {"train_samples": len(train), "test_samples": len(test), "dim": train.shape[1]}
    for method in (["dot", "cosine"] if cfg.function == "both" else [cfg.function]):
        scores = score_matrix(test, train, method)  # (M, N)
        top = scores.topk(k, dim=1)
        out = ctx.dir / "scores" / method
        out.mkdir(parents=True, exist_ok=True)
        for i in range(len(test)):
            ranked = [{"rank": r, "index": j, "score": s, **rows[j]}
                      for r, (s, j) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True))]
            (out / f"test_{i}.json").write_text(json.dumps(ranked, indent=2, ensure_ascii=False) + "\n")
        metrics[f"{method}_top1_mean"] = top.values[:, 0].mean().item()
    ctx.log_metrics(metrics)
    return metrics
