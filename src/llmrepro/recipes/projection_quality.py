"""projection-quality: how well randomly projected gradients preserve the full gradients' rankings.

Reproduces the evaluation of the 'Gradient dimensionality reduction' project: for every test sample, the
train samples ranked by similarity of projected gradients are compared with the ranking by full gradients,
with Kendall's tau and Spearman's rho (scipy.stats) and NDCG@k, per projection type and dimension.

NDCG@k here: the full ranking's top k train samples are the relevant ones, graded k, k-1, ..., 1 by their
full rank; the projected ranking's top k is scored against them (1 = same top k in the same order).
The projections are applied here to the full gradients of two extract-gradients runs, with the same traker
projectors as extraction, so every (type, dim) is compared on identical gradients.

Output: `quality.json` (per test sample and projection), `quality.md` (mean +- std table), `quality.png`.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.gradients import store
from llmrepro.gradients.projection import Projection
from llmrepro.gradients.similarity import score_matrix

METRICS = ("spearman", "kendall", "ndcg")


class Config(RecipeConfig):
    train: RunRef  # an extract-gradients run of full (unprojected) gradients
    test: RunRef
    projections: list[Projection] = Field(min_length=1)
    function: str = Field("dot", pattern="^(dot|cosine)$")
    ndcg_k: int = Field(10, ge=1)


def ndcg_at_k(full: np.ndarray, projected: np.ndarray, k: int) -> float:
    """NDCG@k of the projected ranking, relevance k - r for the r-th (0-based) of the full ranking's top k."""
    k = min(k, len(full))
    relevance = np.zeros(len(full))
    relevance[np.argsort(-full, kind="stable")[:k]] = np.arange(k, 0, -1)
    discounts = 1 / np.log2(np.arange(2, k + 2))
    ideal = np.sort(relevance)[::-1][:k] @ discounts
    return float(relevance[np.argsort(-projected, kind="stable")[:k]] @ discounts / ideal)


def agreement(full: np.ndarray, projected: np.ndarray, k: int) -> dict[str, float]:
    """Ranking agreement of two score vectors over the same train samples."""
    from scipy import stats

    return {"spearman": float(stats.spearmanr(full, projected).statistic),
            "kendall": float(stats.kendalltau(full, projected).statistic),
            "ndcg": ndcg_at_k(full, projected, k)}


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), constrained_layout=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for ptype in sorted({s["type"] for s in summary.values()}):
            pts = sorted((s["dim"], s[f"{metric}_mean"], s[f"{metric}_std"]) for s in summary.values() if s["type"] == ptype)
            dims, means, stds = zip(*pts, strict=True)
            ax.errorbar(dims, means, yerr=stds, marker="o", capsize=3, label=ptype)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("projection dimension")
        ax.set_title(metric)
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config, ctx) -> dict:
    from llmrepro.gradients.projection import Projector
    from llmrepro.lm.models import default_device

    train, _, train_meta = store.load(ctx.require(cfg.train, "extract-gradients").path)
    test, _, test_meta = store.load(ctx.require(cfg.test, "extract-gradients").path)
    if train_meta["projection"] or test_meta["projection"]:
        raise UserError("projection-quality needs full gradients (extractions without projection) for train and test")
    if train.shape[1] != test.shape[1]:
        raise UserError(f"train gradient dimension {train.shape[1]} != test {test.shape[1]}")
    device = default_device()
    full = score_matrix(test, train, cfg.function).numpy()  # (M, N)
    per_sample, summary = {}, {}
    for spec in ctx.progress(cfg.projections, desc="projections"):
        projector = Projector(spec, train.shape[1], device)
        proj = score_matrix(projector.project(test.float()).cpu(), projector.project(train.float()).cpu(), cfg.function).numpy()
        rows = [agreement(full[i], proj[i], cfg.ndcg_k) for i in range(len(full))]
        key = spec.folder
        per_sample[key] = rows
        summary[key] = {"type": spec.type.value, "dim": spec.dim, **{
            f"{m}_{agg}": float(fn([r[m] for r in rows])) for m in METRICS for agg, fn in (("mean", np.mean), ("std", np.std))}}
    io.write_json(ctx.dir / "quality.json", {"summary": summary, "per_test_sample": per_sample})
    header = "| projection | dim | " + " | ".join(f"{m} (mean ± std)" for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METRICS))]
    for s in summary.values():
        lines.append(f"| {s['type']} | {s['dim']} | " + " | ".join(
            f"{s[f'{m}_mean']:.3f} ± {s[f'{m}_std']:.3f}" for m in METRICS) + " |")
    (ctx.dir / "quality.md").write_text(
        f"Ranking agreement with full gradients ({cfg.function}, {len(test)} test x {len(train)} train samples, "
        f"NDCG@{cfg.ndcg_k})\n\n" + "\n".join(lines) + "\n")
    plot(summary, ctx.dir / "quality.png")
    metrics = {f"{key}_{m}": s[f"{m}_mean"] for key, s in summary.items() for m in METRICS}
    ctx.log_metrics(metrics)
    return metrics
