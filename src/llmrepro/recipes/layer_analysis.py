"""layer-analysis: which parameter tensors carry the signal that finds a sample's original from its paraphrase.

Reproduces the gradient-similarity project's layer-analysis notebook from layer-dot-products runs (several
partition runs are merged first):
- top-1 accuracy among the BM25 candidates per tensor (cosine D_po / sqrt(D_pp D_oo)) and averaged per
  component (embed, q, k, v, o, gate, up, down, norms), against the BM25 baseline (its first candidate)
  and the full gradient (sum D_po / sqrt(sum D_pp sum D_oo));
- Pearson and Spearman correlation of each tensor's similarities with the full-gradient ones, over pairs;
- greedy forward selection: repeatedly add the tensor that most raises the accuracy of the cosine over the
  selected tensors, recording accuracy against the percentage of parameters used;
- self-similarity: mean cosine of a paraphrased sample with its own original vs with the other candidates;
- the distribution of parameters over tensors, components and layers.
Writes `analysis.json`, PNG plots and `report.md`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from pydantic import Field

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.gradients import similarity


class Config(RecipeConfig):
    dot_products: list[RunRef] = Field(min_length=1)  # layer-dot-products runs: partitions are merged


def read_dot_products(paths: list[Path]) -> dict:
    parts = []
    for path in paths:
        p = path / "dot_products.json"
        try:
            parts.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{p}: not a dot-products file ({err})") from None
    return similarity.merge(parts)


def layer_of(name: str) -> str:
    m = re.search(r"\.(?:layers|h|layer)\.(\d+)\.", name)
    return f"layer {int(m.group(1)):02d}" if m else "outside layers"


def greedy_selection(po: np.ndarray, pp: np.ndarray, oo: np.ndarray, sizes: np.ndarray, truth: np.ndarray,
                     names: list[str]) -> list[dict]:
    """Forward selection of tensors by the accuracy of the cosine over the selected ones."""
    selected, remaining = [], list(range(len(names)))
    s_po, s_pp, s_oo = (np.zeros(len(po)) for _ in range(3))
    steps = []
    while remaining:
        r = np.array(remaining)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.nan_to_num((s_po[:, None] + po[:, r]) / np.sqrt((s_pp[:, None] + pp[:, r]) * (s_oo[:, None] + oo[:, r])))
        acc = similarity.top1_accuracy(cos, truth)  # (len(remaining),)
        best = int(r[int(np.argmax(acc))])
        selected.append(best)
        remaining.remove(best)
        s_po, s_pp, s_oo = s_po + po[:, best], s_pp + pp[:, best], s_oo + oo[:, best]
        steps.append({"tensor": names[best], "accuracy": float(acc.max()),
                      "percent_params": float(100 * sizes[selected].sum() / sizes.sum())})
    return steps


def correlations(per: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import stats

    pearson, spearman = [], []
    for t in range(per.shape[1]):
        constant = np.ptp(per[:, t]) == 0 or np.ptp(full) == 0
        pearson.append(np.nan if constant else stats.pearsonr(per[:, t], full)[0])
        spearman.append(np.nan if constant else stats.spearmanr(per[:, t], full)[0])
    return np.array(pearson), np.array(spearman)


def analyse(dots: similarity.DotProducts, p_ids: list[str], o_ids: list[str]) -> dict:
    names = list(dots.tensors)
    sizes = np.array([dots.tensors[n] for n in names], dtype=np.float64)
    comps = [similarity.component(n) for n in names]
    keys, po, pp, oo = dots.matrices()
    full, per = similarity.cosines(po, pp, oo)
    truth = similarity.truth_positions(dots, p_ids, o_ids)
    if not (truth >= 0).any():
        raise UserError("no paraphrased sample has its original among the candidates: ids do not link up")
    acc_tensor = similarity.top1_accuracy(per, truth)
    pearson, spearman = correlations(per, full)
    own = np.zeros(len(keys), dtype=bool).reshape(len(truth), -1)
    own[np.arange(len(truth))[truth >= 0], truth[truth >= 0]] = True
    own = own.reshape(-1)
    component_names = [c for c in [*similarity.COMPONENTS, "other"] if c in comps]
    comp_of, layer_of_t = np.array(comps), np.array([layer_of(n) for n in names])
    layers = sorted(set(layer_of_t))
    share = 100 * sizes / sizes.sum()
    return {
        "samples": len(truth), "samples_with_original": int((truth >= 0).sum()), "pairs": len(keys),
        "accuracy_full": float(similarity.top1_accuracy(full, truth)),
        "accuracy_bm25": float((truth[truth >= 0] == 0).mean()),
        "tensors": {n: {"component": comps[i], "layer": layer_of(n), "params": int(sizes[i]),
                        "percent_params": float(share[i]), "accuracy": float(acc_tensor[i]),
                        "pearson_vs_full": float(pearson[i]), "spearman_vs_full": float(spearman[i]),
                        "self_similarity": float(per[own, i].mean()),
                        "other_similarity": float(per[~own, i].mean()) if (~own).any() else None}
                    for i, n in enumerate(names)},
        "components": {c: {"accuracy_mean": float(acc_tensor[comp_of == c].mean()), "tensors": int((comp_of == c).sum()),
                           "percent_params": float(share[comp_of == c].sum())} for c in component_names},
        "layers": {layer: {"percent_params": float(share[layer_of_t == layer].sum())} for layer in layers},
        "self_similarity_full": float(full[own].mean()),
        "other_similarity_full": float(full[~own].mean()) if (~own).any() else None,
        "greedy": greedy_selection(po, pp, oo, sizes, truth, names),
    }


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensors = result["tensors"]
    names = list(tensors)
    files = []

    def baselines(ax):
        ax.axhline(result["accuracy_bm25"], color="tab:red", linestyle="--", label=f"BM25 ({result['accuracy_bm25']:.2f})")
        ax.axhline(result["accuracy_full"], color="tab:green", linestyle=":", label=f"full gradient ({result['accuracy_full']:.2f})")
        ax.set_ylim(0, 1.05)
        ax.legend(loc="lower right")

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(names)), 4.5))
    ax.bar(range(len(names)), [tensors[n]["accuracy"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Accuracy per parameter tensor")
    baselines(ax)
    save(fig, "accuracy_per_tensor.png")

    comps = result["components"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(comps), [c["accuracy_mean"] for c in comps.values()])
    ax.set_ylabel("mean top-1 accuracy of its tensors")
    ax.set_title("Accuracy per component")
    baselines(ax)
    save(fig, "accuracy_per_component.png")

    greedy = result["greedy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([g["percent_params"] for g in greedy], [g["accuracy"] for g in greedy], marker="o", markersize=3)
    ax.set_xlabel("% of parameters in the selected tensors")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Greedy forward selection of tensors")
    baselines(ax)
    save(fig, "greedy_selection.png")

    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(names)), 4.5))
    ax.bar(range(len(names)), [tensors[n]["spearman_vs_full"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("Spearman rho with full-gradient cosine")
    ax.set_title("Layer vs full similarity")
    save(fig, "correlation_vs_full.png")

    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers)), 4))
    ax.bar(list(layers), [v["percent_params"] for v in layers.values()])
    ax.set_xticks(range(len(layers)), list(layers), rotation=90)
    ax.set_ylabel("% of parameters")
    ax.set_title("Parameters per layer")
    save(fig, "parameters_per_layer.png")
    return files


def report(result: dict, plots: list[str]) -> str:
    lines = ["# Gradient similarity: layer analysis", "",
             f"{result['samples']} paraphrased samples ({result['samples_with_original']} with their original among "
             f"the candidates), {result['pairs']} pairs.", "",
             "| method | top-1 accuracy |", "|---|---|",
             f"| BM25 (first candidate) | {result['accuracy_bm25']:.3f} |",
             f"| full gradient cosine | {result['accuracy_full']:.3f} |", "",
             f"Self-similarity (full gradient): {result['self_similarity_full']:.3f} with the own original vs "
             f"{result['other_similarity_full'] or float('nan'):.3f} with the other candidates.", "",
             "## Per component", "", "| component | tensors | % params | mean accuracy |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['tensors']} | {v['percent_params']:.2f} | {v['accuracy_mean']:.3f} |"
              for c, v in result["components"].items()]
    best = sorted(result["tensors"].items(), key=lambda kv: -kv[1]["accuracy"])[:10]
    lines += ["", "## Best tensors", "", "| tensor | % params | accuracy | Spearman vs full |", "|---|---|---|---|"]
    lines += [f"| {n} | {v['percent_params']:.2f} | {v['accuracy']:.3f} | {v['spearman_vs_full']:.3f} |" for n, v in best]
    lines += ["", "## Greedy selection (first 10 steps)", "", "| step | tensor | % params | accuracy |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {g['tensor']} | {g['percent_params']:.2f} | {g['accuracy']:.3f} |"
              for i, g in enumerate(result["greedy"][:10])]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def run(cfg: Config, ctx) -> dict:
    data = read_dot_products([ctx.require(ref, "layer-dot-products").path for ref in cfg.dot_products])
    dots, p_ids, o_ids = similarity.from_json(data)
    result = analyse(dots, p_ids, o_ids)
    io.write_json(ctx.dir / "analysis.json", result)
    plots = plot(result, ctx.dir)
    (ctx.dir / "report.md").write_text(report(result, plots))
    best = max(result["tensors"].items(), key=lambda kv: kv[1]["accuracy"])
    return {"samples": result["samples"], "accuracy_full": result["accuracy_full"],
            "accuracy_bm25": result["accuracy_bm25"], "best_tensor_accuracy": best[1]["accuracy"],
            "tensors": len(result["tensors"])}
