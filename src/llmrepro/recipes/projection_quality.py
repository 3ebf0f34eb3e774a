"""projection-quality: how well randomly projected gradients keep the train rankings of the full gradients.

Reproduces the evaluation in `DAP_main_results.ipynb` of the 'Gradient dimensionality reduction' project
@ d73147d. For every test sample the train samples are ranked by similarity of their gradients (dot product
or cosine); the ranking by projected gradients (normal or Rademacher, each dimension) is compared with the
one by full gradients, one value per test sample:
- Kendall's tau and Spearman's rho (scipy.stats) of the list positions, and NDCG (sklearn `ndcg_score` over
  the whole list, relevance 1/(full rank + 1), predicted score 1/(projected rank + 1)); the notebook shows
  their distributions as violins (cell 10), so the metrics are the medians;
- permutation tests of the median difference between consecutive dimensions of one panel (numpy
  `default_rng(42)` once per panel, 1000 permutations, two-sided, p = share of |permuted| >= |observed|,
  metrics then dimension pairs in the notebook's order: the same values give the same p-values);
- cross comparisons, full dot vs projected cosine and full cosine vs projected dot (cell 21);
- Spearman's rho between the cosine ranking and the dot ranking at the same dimension (cell 19);
- the mean over test samples of the standard deviation of the train scores (cell 17);
- extra: NDCG@k (`ndcg_k`): the full ranking's top k graded k, k-1, ..., 1, scored on the projected top k.
Test samples are taken in the notebook's order (its file names sorted as strings: 0, 1, 10, 11, ..., 19, 2,
20, ...), which only the permutation tests see.

Rankings (`llmrepro.gradients.ranking`): `ranking: source` (default) scores as explain.py did (stored dtype,
CPU), sorts with Python's sort and then drops the `exclude_ids` (default the source's `open_orca_t0.1598436`,
whose all-zero gradient has a NaN float16 cosine, so its full-cosine lists are only partly sorted and the
published cosine agreement is low at every dimension); `ranking: fixed` scores in float32 and drops the
excluded rows before ranking by score.

Projections come from their own extract-gradients runs (`projected`: train/test pairs, as the source
extracted every projection in its own pass) and/or are made here from the full gradients (`projections`,
with the same traker projectors: equal in exact arithmetic, for 2 extraction runs instead of 18).

Output: the metrics, `quality.json` (every value per test sample), `quality.md` (tables), `quality.png` (the
2 x 2 violins of cell 10), `cross.png` (cell 21), `dot_vs_cosine.png` (cell 19).

Deliberate differences from the source:
- the scores are computed here from the gradients; the notebook read explain.py's sorted JSON files. With
  `ranking: source` the scores and orders are the same, up to the last bit of float16 sums (torch splits a
  CPU reduction by shape and thread count);
- every test sample is used (the notebook hard-coded 100) and the train ids come from the full train run;
- `projections` may replace extracted projection runs (the notebook had only extracted ones);
- NDCG@k, the means and the interquartile ranges are added; the cross comparisons get no p-values (the
  notebook computed them but did not show them), and cell 19 is computed for both projection types (the
  notebook: Rademacher).
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.gradients import store
from llmrepro.gradients.projection import Projection
from llmrepro.gradients.ranking import CHUNK_ROWS, Ranking, fixed_order, rank, score

if TYPE_CHECKING:
    import numpy as np

SOURCE_METRICS = ("kendall", "spearman", "ndcg")  # the notebook's, in its permutation-test order
FUNCTIONS = ("dot", "cosine")
SAME_EXTRACTION = ("model", "data", "paradigm", "target", "template", "padding", "checkpoint", "max_length",
                   "grad_dtype")  # what a projected run must share with the full run it is compared with


class ProjectedRuns(Strict):
    """A pair of extract-gradients runs with the same projection: train and test samples."""

    train: RunRef
    test: RunRef


class Config(RecipeConfig):
    train: RunRef  # an extract-gradients run of full (unprojected) gradients
    test: RunRef
    projected: list[ProjectedRuns] = []  # projections extracted in their own runs (the source's way)
    projections: list[Projection] = []  # projections made here from the full gradients
    functions: list[Literal["dot", "cosine"]] = Field(["dot", "cosine"], min_length=1)
    ranking: Ranking = "source"  # fixed: float32 scores, excluded rows dropped before ranking by score
    exclude_ids: list[str] = ["open_orca_t0.1598436"]  # train rows dropped from every list (by `id`)
    ndcg_k: int = Field(10, ge=1)
    permutations: int = Field(1000, ge=1)
    permutation_seed: int = 42
    chunk_rows: int = Field(CHUNK_ROWS, ge=1)  # train rows per float16 product (memory)

    @model_validator(mode="after")
    def _settings(self):
        if not self.projected and not self.projections:
            raise ValueError("give projected (extracted projection runs) or projections (to make here), or both")
        keys = [(p.type.value, p.dim) for p in self.projections]
        if len(set(keys)) != len(keys):
            raise ValueError("projections: each (type, dim) once")
        if len(set(self.functions)) != len(self.functions):
            raise ValueError("functions: each of dot, cosine once")
        return self


# ------------------------------------------------------------------------------------------ metrics

def ndcg_at_k(rank_b: np.ndarray, k: int) -> float:
    """NDCG@k of ranking b against ranking a, for items listed in a's order (rank_b[i]: b's rank of a's i-th):
    a's top k are graded k, k-1, ..., 1, and b's top k are scored with them (1: same top k, same order)."""
    import numpy as np

    k = min(k, len(rank_b))
    relevance = np.zeros(len(rank_b))
    relevance[:k] = np.arange(k, 0, -1)
    discounts = 1 / np.log2(np.arange(2, k + 2))
    return float(relevance[np.argsort(rank_b, kind="stable")[:k]] @ discounts / (relevance[:k] @ discounts))


def rank_agreement(order_a: list[int], order_b: list[int], k: int) -> dict[str, float]:
    """The notebook's `compute_metric` for one test sample: a's list positions 0..n-1 against the positions of
    the same items in b; plus NDCG@k."""
    import numpy as np
    from scipy import stats
    from sklearn.metrics import ndcg_score

    pos_b = {j: r for r, j in enumerate(order_b)}
    if len(pos_b) != len(order_a) or any(j not in pos_b for j in order_a):
        raise UserError("the rankings compared do not hold the same train samples")
    rank_a, rank_b = np.arange(len(order_a)), np.array([pos_b[j] for j in order_a])
    return {"kendall": float(stats.kendalltau(rank_a, rank_b).statistic),
            "spearman": float(stats.spearmanr(rank_a, rank_b).statistic),
            "ndcg": float(ndcg_score([1 / (rank_a + 1)], [1 / (rank_b + 1)])),
            "ndcg_at_k": ndcg_at_k(rank_b, k)}


def agreement(full: np.ndarray, projected: np.ndarray, k: int) -> dict[str, float]:
    """Agreement of the rankings two score vectors over the same train samples make (by score)."""
    return rank_agreement(fixed_order(full), fixed_order(projected), k)


def compare(base: list[list[int]], other: list[list[int]], k: int) -> dict[str, list[float]]:
    """Per test sample, the agreement of `other`'s ranking with `base`'s: {metric: [value per test sample]}."""
    rows = [rank_agreement(a, b, k) for a, b in zip(base, other, strict=True)]
    return {m: [r[m] for r in rows] for m in rows[0]}


def median_permutation_tests(groups: list[dict[str, list[float]]], permutations: int, seed: int) -> dict[str, list[float]]:
    """The notebook's `perform_median_tests`: for each metric, then each pair of consecutive groups, the share
    of `permutations` random splits of the pooled values whose |median difference| reaches the observed one.
    One generator for the whole panel, used in that order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for metric in SOURCE_METRICS:
        out[metric] = []
        for g1, g2 in pairwise(groups):
            a, b = np.asarray(g1[metric]), np.asarray(g2[metric])
            observed = np.median(a) - np.median(b)
            pooled = np.concatenate([a, b])
            perms = np.stack([rng.permutation(pooled) for _ in range(permutations)])  # the same draws, in order
            diffs = np.median(perms[:, :len(a)], axis=1) - np.median(perms[:, len(a):], axis=1)
            out[metric].append(float(np.mean(np.abs(diffs) >= abs(observed))))
    return out


def notebook_order(n_test: int) -> list[int]:
    """Test samples in the order the notebook read their files: `..._test_{i}.json` sorted as strings."""
    return sorted(range(n_test), key=lambda i: f"test_{i}.json")


# ------------------------------------------------------------------------------------------ gradients

def _check_same(full_params: dict, params: dict, what: str) -> None:
    differ = [k for k in SAME_EXTRACTION if full_params.get(k) != params.get(k)]
    if differ:
        raise UserError(f"{what} was extracted with other {', '.join(differ)} than the full gradients; "
                        "extract it the same way")


def settings(cfg: Config, ctx, full: dict) -> list[tuple]:
    """[(type, dim, where, load)] of every projection compared, checked before any gradient is read;
    `load()` reads (or makes) its (train, test) gradients. `full`: {side: (gradients, params, meta)}."""
    from llmrepro.gradients import shards
    from llmrepro.gradients.projection import Projector
    from llmrepro.lm.models import default_device

    out = []
    for pair in cfg.projected:
        described = {}
        for side in ("train", "test"):
            ref = getattr(pair, side)
            directory, params, meta = store.describe(ctx.require(ref, "extract-gradients").path)
            if not meta["projection"]:
                raise UserError(f"projected: {ref.describe()} stores full gradients, not projected ones")
            _check_same(full[side][1], params, ref.describe())
            if meta["samples"] != full[side][2]["samples"]:
                raise UserError(f"{ref.describe()} has {meta['samples']} samples, the full {side} gradients "
                                f"{full[side][2]['samples']}")
            described[side] = (directory, meta)
        spec = described["train"][1]["projection"]
        if (spec["type"], spec["dim"]) != (described["test"][1]["projection"]["type"],
                                           described["test"][1]["projection"]["dim"]):
            raise UserError(f"projected: {pair.train.describe()} and {pair.test.describe()} use different projections")

        def load(described=described):
            return tuple(shards.load_all(d, m["samples"], m["gradients_per_file"]) for d, m in described.values())

        out.append((spec["type"], spec["dim"], {"extracted": spec}, load))
    device = default_device()
    for spec in cfg.projections:
        def make(spec=spec):
            projector = Projector(spec, full["train"][0].shape[1], device)
            return tuple(project_rows(projector, full[side][0]) for side in ("train", "test"))

        out.append((spec.type.value, spec.dim, {"projected_here": spec.model_dump(mode="json")}, make))
    keys = [(t, d) for t, d, _, _ in out]
    if len(set(keys)) != len(keys):
        raise UserError("a projection (type, dim) is given twice (in projected and projections)")
    return out


def project_rows(projector, grads, rows: int = 256):
    """Project (N, D) gradients a bounded number of rows at a time -> (N, dim) float32 on the CPU."""
    import torch

    return torch.cat([projector.project(grads[i:i + rows]).cpu() for i in range(0, len(grads), rows)])


# ------------------------------------------------------------------------------------------ the recipe

def run(cfg: Config, ctx) -> dict:
    import numpy as np

    from llmrepro.lm import data
    from llmrepro.lm.data import DataConfig

    loaded = {side: store.load(ctx.require(getattr(cfg, side), "extract-gradients").path) for side in ("train", "test")}
    if loaded["train"][2]["projection"] or loaded["test"][2]["projection"]:
        raise UserError("projection-quality needs full gradients (extractions without projection) for train and test")
    (full_train, full_params, _), (full_test, _, _) = loaded["train"], loaded["test"]
    if full_train.shape[1] != full_test.shape[1]:
        raise UserError(f"train gradient dimension {full_train.shape[1]} != test {full_test.shape[1]}")
    compared = settings(cfg, ctx, loaded)
    rows = data.load_rows(DataConfig.model_validate(full_params["data"]), ctx)
    if len(rows) != len(full_train):
        raise UserError(f"{len(full_train)} train gradients but {len(rows)} rows in {full_params['data']['name']}")
    excluded = {j for j, r in enumerate(rows) if r.get("id") in cfg.exclude_ids}
    if missing := set(cfg.exclude_ids) - {rows[j]["id"] for j in excluded}:
        ctx.log.warning("exclude_ids not in the train data: %s", ", ".join(sorted(missing)))
    tests = notebook_order(len(full_test))
    k = cfg.ndcg_k

    def side(test, train):
        """{function: (scores (M, N) in notebook order, orders)} of one set of gradients."""
        out = {}
        for f in cfg.functions:
            s = score(test, train, f, cfg.ranking, cfg.chunk_rows)[tests]
            out[f] = (s, rank(s, cfg.ranking, excluded))
        return out

    keep = np.array([j not in excluded for j in range(len(rows))])
    ctx.log.info("scoring %d x %d full gradients (%s, ranking %s)", len(full_test), len(full_train),
                 ", ".join(cfg.functions), cfg.ranking)
    full = side(full_test, full_train)
    per, summary = {}, {}  # per: {setting: {comparison: {metric: [per test]}}}
    spread = {f: float(np.mean([np.std(s[keep]) for s in full[f][0]])) for f in cfg.functions}
    both = set(cfg.functions) == set(FUNCTIONS)
    dot_vs_cos = {"full": compare(full["cosine"][1], full["dot"][1], k)["spearman"]} if both else {}
    for ptype, dim, where, load in ctx.progress(compared, desc="projections"):
        train, test = load()
        proj = side(test, train)
        key = f"{ptype}_{dim}"
        per[key] = {f: compare(full[f][1], proj[f][1], k) for f in cfg.functions}
        if both:
            per[key]["full_dot_vs_cosine"] = compare(full["dot"][1], proj["cosine"][1], k)
            per[key]["full_cosine_vs_dot"] = compare(full["cosine"][1], proj["dot"][1], k)
            dot_vs_cos[key] = compare(proj["cosine"][1], proj["dot"][1], k)["spearman"]
        summary[key] = {"type": ptype, "dim": dim, **where,
                        "score_std_mean": {f: float(np.mean([np.std(s[keep]) for s in proj[f][0]]))
                                           for f in cfg.functions}}
    panels = {(f, t): sorted((s["dim"] for s in summary.values() if s["type"] == t), reverse=True)
              for f in cfg.functions for t in sorted({s["type"] for s in summary.values()})}
    p_values = {(f, t): median_permutation_tests([per[f"{t}_{d}"][f] for d in dims], cfg.permutations,
                                                 cfg.permutation_seed) for (f, t), dims in panels.items()}

    metrics = metric_table(per, panels, p_values, spread, summary, dot_vs_cos, k)
    io.write_json(ctx.dir / "quality.json", {
        "test_order": tests, "excluded": sorted(excluded), "ranking": cfg.ranking, "settings": summary,
        "per_test_sample": per, "dot_vs_cosine_spearman": dot_vs_cos,
        "p_values": {f"{f}_{t}": v for (f, t), v in p_values.items()}, "full_score_std_mean": spread})
    (ctx.dir / "quality.md").write_text(report(cfg, per, panels, p_values, spread, summary, dot_vs_cos,
                                               len(full_test), len(full_train) - len(excluded)))
    plot_panels(per, panels, p_values, {f: f"full vs projected {f}" for f in cfg.functions},
                ctx.dir / "quality.png", "{f}, {t} projection")
    if both:
        plot_panels(per, {(c, t): d for c in ("full_dot_vs_cosine", "full_cosine_vs_dot")
                          for (f, t), d in panels.items() if f == "dot"}, None,
                    {"full_dot_vs_cosine": "full dot vs projected cosine",
                     "full_cosine_vs_dot": "full cosine vs projected dot"}, ctx.dir / "cross.png", "{f}, {t} projection")
        plot_histograms(dot_vs_cos, ctx.dir / "dot_vs_cosine.png")
    ctx.log_metrics(metrics)
    return metrics


def metric_table(per, panels, p_values, spread, summary, dot_vs_cos, k) -> dict:
    """The scalar metrics: medians per panel and dimension, p-values, cross medians, spreads, dot vs cosine."""
    import numpy as np

    med = lambda values: float(np.median(values))  # noqa: E731
    out = {}
    for (f, t), dims in panels.items():
        for d in dims:
            for m, values in per[f"{t}_{d}"][f].items():
                out[f"{f}_{t}_{d}_{f'ndcg_at_{k}' if m == 'ndcg_at_k' else m}_median"] = med(values)
        for m, ps in p_values[(f, t)].items():
            for (d1, d2), p in zip(pairwise(dims), ps, strict=True):
                out[f"{f}_{t}_{m}_p_{d1}_vs_{d2}"] = p
    for key, comparisons in per.items():
        for c in ("full_dot_vs_cosine", "full_cosine_vs_dot"):
            if c in comparisons:
                fa, fb = c.removeprefix("full_").split("_vs_")
                for m in SOURCE_METRICS:
                    out[f"full_{fa}_vs_{key}_{fb}_{m}_median"] = med(comparisons[c][m])
    for f, v in spread.items():
        out[f"{f}_full_score_std_mean"] = v
        for key, s in summary.items():
            out[f"{f}_{key}_score_std_mean"] = s["score_std_mean"][f]
    for key, values in dot_vs_cos.items():
        out[f"dot_vs_cosine_{key}_spearman_mean"] = float(np.mean(values))
    return out


# ------------------------------------------------------------------------------------------ report, plots

def _fmt(values) -> str:
    import numpy as np

    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:.3f} [{q1:.3f}, {q3:.3f}]"


def report(cfg, per, panels, p_values, spread, summary, dot_vs_cos, n_test: int, n_train: int) -> str:
    import numpy as np

    k = cfg.ndcg_k
    lines = [f"# Projected vs full gradient rankings ({n_test} test x {n_train} train samples, ranking: "
             f"{cfg.ranking}, excluded: {', '.join(cfg.exclude_ids) or 'none'})", "",
             "Median [interquartile range] over test samples, as the notebook's violins (DAP_main_results.ipynb "
             "cell 10). p: permutation test of the median difference to the next dimension.", ""]
    names = {"kendall": "Kendall tau", "spearman": "Spearman rho", "ndcg": "NDCG", "ndcg_at_k": f"NDCG@{k}"}
    for (f, t), dims in panels.items():
        lines += [f"## {f}, {t} projection", "", "| dim | " + " | ".join(names.values()) + " |",
                  "|---|" + "---|" * len(names)]
        for d in dims:
            lines.append(f"| {d:,} | " + " | ".join(_fmt(per[f"{t}_{d}"][f][m]) for m in names) + " |")
        for m, ps in p_values[(f, t)].items():
            pairs = ", ".join(f"{d1:,} vs {d2:,}: {p:.3f}" for (d1, d2), p in zip(pairwise(dims), ps, strict=True))
            if pairs:
                lines.append(f"\np ({names[m]}): {pairs}")
        lines.append("")
    if dot_vs_cos:
        lines += ["## Cross comparisons (cell 21): median Kendall tau / Spearman rho / NDCG", "",
                  "| projection | full dot vs projected cosine | full cosine vs projected dot |", "|---|---|---|"]
        for key in per:
            cells = [" / ".join(f"{np.median(per[key][c][m]):.3f}" for m in SOURCE_METRICS)
                     for c in ("full_dot_vs_cosine", "full_cosine_vs_dot")]
            lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
        lines += ["", "## Spearman rho between the cosine and the dot rankings (cell 19): mean", "",
                  "| gradients | rho |", "|---|---|"]
        lines += [f"| {key} | {np.mean(v):.3f} |" for key, v in dot_vs_cos.items()]
    lines += ["", "## Mean over test samples of the std of the train scores (cell 17)", "",
              "| gradients | " + " | ".join(cfg.functions) + " |", "|---|" + "---|" * len(cfg.functions),
              "| full | " + " | ".join(f"{spread[f]:.4g}" for f in cfg.functions) + " |"]
    lines += [f"| {key} | " + " | ".join(f"{s['score_std_mean'][f]:.4g}" for f in cfg.functions) + " |"
              for key, s in summary.items()]
    return "\n".join(lines) + "\n"


def plot_panels(per, panels, p_values, titles: dict, path, title: str) -> None:
    """One violin panel per (comparison, type): metrics on x, one violin per dimension (as cell 10/21)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = list(dict.fromkeys(c for c, _ in panels))
    types = list(dict.fromkeys(t for _, t in panels))
    fig, axes = plt.subplots(len(comparisons), len(types), figsize=(7.5 * len(types), 4.5 * len(comparisons) + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    low = min(min(min(v) for v in per[f"{t}_{d}"][c].values()) for (c, t), dims in panels.items() for d in dims)
    for (c, t), dims in panels.items():
        ax = axes[comparisons.index(c), types.index(t)]
        for di, d in enumerate(dims):
            pos = [mi + (di - (len(dims) - 1) / 2) * 0.2 for mi in range(len(SOURCE_METRICS))]
            parts = ax.violinplot([per[f"{t}_{d}"][c][m] for m in SOURCE_METRICS], positions=pos, widths=0.18,
                                  showmedians=True, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(f"C{di}")
                body.set_alpha(0.7)
            ax.plot([], [], color=f"C{di}", lw=6, label=f"full vs. {d:,}")
        if p_values:
            for mi, m in enumerate(SOURCE_METRICS):
                for di, p in enumerate(p_values[(c, t)][m]):
                    x = mi + (di + 0.5 - (len(dims) - 1) / 2) * 0.2
                    ax.text(x, min(low, 0.2) + 0.01, f"p≈{round(100 * p)}%", ha="center", fontsize=6.5,
                            color="darkred" if p < 0.05 else "black")
        ax.set_xticks(range(len(SOURCE_METRICS)), ["Kendall's tau", "Spearman's rho", "NDCG"])
        ax.set_ylim(min(low, 0.2) - 0.02, 1.02)
        ax.grid(axis="y", linestyle="--", alpha=0.6)
        ax.set_title(title.format(f=titles[c], t=t))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, title="gradient dimension")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(dot_vs_cos: dict, path) -> None:
    """Cell 19: histograms of the per-test Spearman rho between cosine and dot rankings, one per gradient set."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, (key, values) in enumerate(dot_vs_cos.items()):
        ax.hist(values, bins=20, alpha=0.6, color=f"C{i}", edgecolor="black", label=f"{key} (μ={np.mean(values):.3f})")
    ax.set_xlabel("Spearman's rho between cosine and dot rankings")
    ax.set_ylabel("test samples")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
