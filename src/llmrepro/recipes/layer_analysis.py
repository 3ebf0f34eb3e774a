"""layer-analysis: which parameter tensors carry the signal that finds a sample's original from its variant.

Reproduces the gradient-similarity project's `notebooks/analysis.ipynb` (lukas-hinterleitner/master-thesis @
e6ebdbe) from per-tensor dot products (layer-dot-products runs, partitions merged; or the source's own
dot-product files):
- scores (cell 3): top-1 accuracy of the full-gradient cosine sum D_po / sqrt(sum D_pp sum D_oo) and of BM25
  (its first candidate), the mean and median highest cosine, the wrong decisions;
- accuracy per tensor (cell 6) of the per-tensor cosine D_po / sqrt(D_pp D_oo), and its mean per component;
- layer vs full (cell 9): the uncentred cosine x.y / (|x||y|) between a tensor's similarities over all pairs
  and the full-gradient ones (Pearson and Spearman correlations are extra columns);
- greedy forward selection by similarity (cell 11: add the tensor whose summed dot products give
  similarities closest, by that uncentred cosine, to the full ones) and by accuracy (cells 18-19), each
  against the cumulative percentage of parameters, with the 1% / 5% random projections as points
  (gradient-similarity runs with projection, or the source's projected file; cells 10, 17, 20);
- per-sample curves (cells 12, 16): for the best tensor, the samples whose candidate similarities diverge
  most from the full gradient's, and their per-tensor similarities over all tensors;
- plots over depth (cells 15, 22: accuracy and layer-vs-full per tensor by depth, attention vs MLP, their
  sub-components), accuracy by parameter count (cell 21), parameters per tensor (cell 26).
Writes `analysis.json`, `per_tensor.csv`, PNG plots, `report.md`, and the notebook's result files in the
source's layout under `results/` (`accuracy_per_layer`, `layer_comparison_full_gradient`,
`parameters_per_layer`: `values.json` with indent 4; `self_similarity_over_layers/<id>/
gradient_similarities_over_layers.csv`). With `compare_with` (a checkout of the source, or a copy of its
`results/`), the per-tensor table gets the source's published values and their differences, line by line.

Deliberate differences from the source:
- ties in both greedy selections go to the first tensor in model order; the source iterated over a Python
  `set` of tensor names, whose order changes with PYTHONHASHSEED (which it never set): the accuracy
  selection ties in most rounds, so its published curve order is one draw of that;
- a per-tensor cosine with a zero norm is 0 (the notebook would divide by zero; it never happens there);
- every candidate pair keeps the o.o computed next to it (from our runs); the notebook used one value per
  original (from the source's files we do the same);
- plots are matplotlib renderings of the notebook's (seaborn) ones; the per-component lines over depth are
  drawn at each layer's depth (`scripts/line_plot_accuracy_per_layer.py` drew every layer one tick to the
  left, at "Embed" for layer 1);
- extras the notebook did not have: Pearson / Spearman columns, mean cosine with the own original vs the
  others, parameters per layer, accuracy per component plot.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.gradients import similarity
from llmrepro.gradients.similarity import ATTENTION, MLP, DotProducts

if TYPE_CHECKING:
    import numpy as np

EPS = 1e-12  # the notebook's


class SourceDotProducts(Strict):
    files: list[str] = Field(min_length=1)  # the source's dot-product files, or directories holding them
    parameters: str  # the source's results/parameters_per_layer/<model>/values.json (tensor sizes, in order)


class SourceResults(Strict):
    root: str  # a checkout of lukas-hinterleitner/master-thesis, or a copy of its data/ and results/
    setting: Literal["paraphrased", "model_generated"]
    model: str = "amd/AMD-OLMo-1B-SFT"

    def path(self, kind: str) -> Path:
        base = Path(self.root).expanduser() / "results" / kind
        if kind == "parameters_per_layer":
            return base / self.model / "values.json"
        return base / self.setting / self.model / "sample_size" / "full" / "values.json"

    def self_similarity_dir(self) -> Path:
        return Path(self.root).expanduser() / "results" / "self_similarity_over_layers" / self.setting / self.model


class Config(RecipeConfig):
    dot_products: list[RunRef] = []  # layer-dot-products runs: partitions are merged
    source_dot_products: SourceDotProducts | None = None  # or the source's own dot-product files
    projected: list[RunRef] = []  # gradient-similarity runs with projection (partitions merged): the 1%/5% points
    source_projected: str | None = None  # or the source's random_projection/.../sample_size_full.json
    compare_with: SourceResults | None = None  # the source's published results, compared tensor by tensor
    divergent_samples: int = Field(3, ge=0)  # per-sample curves for this many most divergent samples

    @model_validator(mode="after")
    def _inputs(self):
        if bool(self.dot_products) == (self.source_dot_products is not None):
            raise ValueError("give dot_products (layer-dot-products runs) or source_dot_products (the source's "
                             "files), one of them")
        if self.projected and self.source_projected:
            raise ValueError("give projected (gradient-similarity runs) or source_projected, not both")
        return self


# ----------------------------------------------------------------------------------------------- inputs

def read_dot_products(paths: list[Path]) -> dict:
    parts = []
    for path in paths:
        parts.append(io.read_user_json(path / "dot_products.json", "not a dot-products file"))
    return similarity.merge(parts)


def load_dots(cfg: Config, ctx) -> tuple[DotProducts, list[str], list[str]]:
    if cfg.source_dot_products is not None:
        sizes = read_values(Path(cfg.source_dot_products.parameters).expanduser())
        return similarity.read_source_dot_products(cfg.source_dot_products.files, {k: int(v) for k, v in sizes.items()})
    data = read_dot_products([ctx.require(ref, "layer-dot-products").path for ref in cfg.dot_products])
    return similarity.from_json(data)


def load_projected(cfg: Config, ctx, num_params: int) -> dict[str, tuple[int, dict]]:
    """label -> (nominal dimension, {p: {o: cosine}}) of each projection."""
    if cfg.source_projected:
        data = similarity.read_similarities(cfg.source_projected)
        if not similarity.is_projected(data):
            raise UserError(f"{cfg.source_projected}: not projected similarities (expected {{dimension: ...}})")
        return {f"{round(int(d) / num_params * 100)}pct": (int(d), data[d]) for d in sorted(data, key=int)}
    if not cfg.projected:
        return {}
    deps = [ctx.require(ref, "gradient-similarity") for ref in cfg.projected]
    data = similarity.merge([similarity.read_similarities(d.path / "similarities.json") for d in deps])
    if not similarity.is_projected(data):
        raise UserError(f"{deps[0].path}: a gradient-similarity run without projection; `projected` needs runs "
                        "with a projection section")
    labels = {int(v): k.removeprefix("dims_") for k, v in io.read_json(deps[0].path / "metrics.json").items()
              if k.startswith("dims_") and not k.startswith("dims_used")}
    return {labels.get(int(d), f"{round(int(d) / num_params * 100)}pct"): (int(d), data[d])
            for d in sorted(data, key=int)}


def read_values(path: Path) -> dict:
    data = io.read_user_json(path, "cannot read the source's values.json")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object {{tensor: value}}")
    return data


# ----------------------------------------------------------------------------------------------- analysis

def layer_of(name: str) -> str:
    m = re.search(r"\.(?:layers|h|layer)\.(\d+)\.", name)
    return f"layer {int(m.group(1)):02d}" if m else "outside layers"


def depth_of(name: str) -> int | None:
    """The notebook's depth label: 0 for the embedding, layer index + 1 inside the layers, None otherwise."""
    if similarity.component(name) == "embed" and "lm_head" not in name and "embed_out" not in name:
        return 0
    m = re.search(r"\.(?:layers|h|layer)\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else None


def short_name(name: str) -> str:
    """The notebook's row label: `model.`, `layers.` and `.weight` removed (`0.self_attn.q_proj`)."""
    return re.sub(r"\.weight$", "", name.replace("model.", "", 1).replace("layers.", "", 1))


def greedy_by_similarity(po, pp, oo, full, sizes, names) -> list[dict]:
    """Cell 11: each round adds the tensor whose accumulated dot products give similarities (0 where a norm
    is 0) with the highest uncentred cosine to the full ones (+1e-12 on the norms); ties: model order."""
    import numpy as np

    s_po, s_pp, s_oo = (np.zeros(len(po)) for _ in range(3))
    remaining, steps, used = list(range(len(names))), [], 0.0
    full_norm = np.linalg.norm(full) + EPS
    while remaining:
        r = np.array(remaining)
        new_po, new_pp, new_oo = s_po[:, None] + po[:, r], s_pp[:, None] + pp[:, r], s_oo[:, None] + oo[:, r]
        denom = np.sqrt(new_pp) * np.sqrt(new_oo)
        c_hat = np.divide(new_po, denom + EPS, out=np.zeros_like(new_po), where=denom > 0)
        rho = (c_hat * full[:, None]).sum(0) / ((np.linalg.norm(c_hat, axis=0) + EPS) * full_norm)
        i = int(np.argmax(rho))  # first maximum: the earliest tensor in model order
        best = int(r[i])
        s_po, s_pp, s_oo = new_po[:, i], new_pp[:, i], new_oo[:, i]
        remaining.remove(best)
        used += sizes[best]
        steps.append({"tensor": names[best], "similarity": float(rho[i]), "percent_params": 100 * used / sizes.sum()})
    return steps


def accuracy_from_sums(po, pp, oo, truth) -> np.ndarray:
    """Cell 18 on accumulated dot products (n_pairs, R): per variant the first candidate with the highest
    similarity above -1 (-inf where sqrt(D_pp D_oo) <= 1e-12); variants with none are left out."""
    import numpy as np

    denom = np.sqrt(pp * oo)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(denom <= EPS, -np.inf, po / np.maximum(denom, EPS))
    grouped = sim.reshape(len(truth), -1, sim.shape[-1])  # (n_p, k, R)
    counted = grouped.max(axis=1) > -1.0  # (n_p, R)
    hit = (grouped.argmax(axis=1) == truth[:, None]) & counted
    total = counted.sum(axis=0)
    return np.where(total > 0, hit.sum(axis=0) / np.maximum(total, 1), 0.0)


def greedy_by_accuracy(po, pp, oo, truth, sizes, names) -> list[dict]:
    """Cells 18-19: each round adds the tensor whose accumulated dot products give the highest accuracy;
    ties: model order."""
    import numpy as np

    s_po, s_pp, s_oo = (np.zeros(len(po)) for _ in range(3))
    remaining, steps, used = list(range(len(names))), [], 0.0
    while remaining:
        r = np.array(remaining)
        new_po, new_pp, new_oo = s_po[:, None] + po[:, r], s_pp[:, None] + pp[:, r], s_oo[:, None] + oo[:, r]
        acc = accuracy_from_sums(new_po, new_pp, new_oo, truth)
        i = int(np.argmax(acc))
        best = int(r[i])
        s_po, s_pp, s_oo = new_po[:, i], new_pp[:, i], new_oo[:, i]
        remaining.remove(best)
        used += sizes[best]
        steps.append({"tensor": names[best], "accuracy": float(acc[i]), "percent_params": 100 * used / sizes.sum()})
    return steps


def correlations(per: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np
    from scipy import stats

    pearson, spearman = [], []
    for t in range(per.shape[1]):
        constant = np.ptp(per[:, t]) == 0 or np.ptp(full) == 0
        pearson.append(np.nan if constant else stats.pearsonr(per[:, t], full)[0])
        spearman.append(np.nan if constant else stats.spearmanr(per[:, t], full)[0])
    return np.array(pearson), np.array(spearman)


def projection_points(projected: dict[str, tuple[int, dict]], keys, p_ids, o_ids, full, truth,
                      num_params: int) -> dict[str, dict]:
    """Per projection: its accuracy, the uncentred cosine of its similarities with the full ones (cell 10),
    and its dimension as a percentage of the parameters."""
    import numpy as np

    out = {}
    for label, (dim, sims) in projected.items():
        try:
            x = np.array([sims[p_ids[p]][o_ids[o]] for p, o in keys], dtype=np.float64)
        except KeyError as err:
            raise UserError(f"the projected similarities have no pair with {err}: they were computed on other "
                            "data or candidates than the dot products") from None
        out[label] = {"dims": dim, "percent_params": 100 * dim / num_params,
                      "accuracy": float(similarity.top1_accuracy(x, truth)),
                      "vs_full": float(similarity.uncentred_cosine(x, full))}
    return out


def analyse(dots: DotProducts, p_ids: list[str], o_ids: list[str], projected: dict | None = None,
            divergent: int = 3) -> dict:
    import numpy as np

    names = list(dots.tensors)
    sizes = np.array([dots.tensors[n] for n in names], dtype=np.float64)
    comps = [similarity.component(n) for n in names]
    keys, po, pp, oo = dots.matrices()
    full, per = similarity.cosines(po, pp, oo)
    truth = similarity.truth_positions(dots, p_ids, o_ids)
    if not (truth >= 0).any():
        raise UserError("no variant has its original among the candidates: ids do not link up")
    n_p, k = len(truth), len(keys) // len(truth)
    acc_tensor = similarity.top1_accuracy(per, truth)
    vs_full = similarity.uncentred_cosine(per, full[:, None])
    pearson, spearman = correlations(per, full)
    own = np.zeros((n_p, k), dtype=bool)
    own[np.arange(n_p)[truth >= 0], truth[truth >= 0]] = True
    own = own.reshape(-1)
    component_names = [c for c in [*similarity.COMPONENTS, "other"] if c in comps]
    comp_of, layer_of_t = np.array(comps), np.array([layer_of(n) for n in names])
    share = 100 * sizes / sizes.sum()
    mean_max, median_max = similarity.max_cosine_stats(full, n_p)
    best = int(np.argmax(acc_tensor))  # first maximum in model order, as the notebook's max(dict)
    # cell 12: per variant, the uncentred cosine of its k similarities under the best tensor and under all
    per_sample = similarity.uncentred_cosine(per[:, best].reshape(n_p, k), full.reshape(n_p, k), axis=1)
    ids = list(dots.candidates)
    curves = {p_ids[ids[i]]: {o_ids[o]: per[i * k + j].tolist() for j, o in enumerate(dots.candidates[ids[i]])}
              for i in np.argsort(per_sample, kind="stable")[:divergent]}
    return {
        "samples": n_p, "samples_with_original": int((truth >= 0).sum()), "pairs": len(keys),
        "accuracy_full": float(similarity.top1_accuracy(full, truth)), "accuracy_bm25": float((truth == 0).mean()),
        "mean_max_cosine": mean_max, "median_max_cosine": median_max,
        "wrong_decisions": similarity.wrong_decisions(dots, p_ids, o_ids),
        "tensors": {n: {"component": comps[i], "layer": layer_of(n), "depth": depth_of(n), "params": int(sizes[i]),
                        "percent_params": float(share[i]), "accuracy": float(acc_tensor[i]),
                        "layer_vs_full": float(vs_full[i]), "pearson_vs_full": float(pearson[i]),
                        "spearman_vs_full": float(spearman[i]),
                        "self_similarity": float(per[own, i].mean()),
                        "other_similarity": float(per[~own, i].mean()) if (~own).any() else None}
                    for i, n in enumerate(names)},
        "components": {c: {"accuracy_mean": float(acc_tensor[comp_of == c].mean()),
                           "layer_vs_full_mean": float(vs_full[comp_of == c].mean()),
                           "tensors": int((comp_of == c).sum()), "percent_params": float(share[comp_of == c].sum())}
                       for c in component_names},
        "layers": {layer: {"percent_params": float(share[layer_of_t == layer].sum())} for layer in sorted(set(layer_of_t))},
        "self_similarity_full": float(full[own].mean()),
        "other_similarity_full": float(full[~own].mean()) if (~own).any() else None,
        "greedy_similarity": greedy_by_similarity(po, pp, oo, full, sizes, names),
        "greedy_accuracy": greedy_by_accuracy(po, pp, oo, truth, sizes, names),
        "best_tensor": names[best],
        "divergent_samples": curves,
        "projection": projection_points(projected or {}, keys, p_ids, o_ids, full, truth, int(sizes.sum())),
    }


# ------------------------------------------------------------------------------------ the source's layout

def dump4(data) -> str:
    """JSON as the source's notebook wrote it (`json.dump(..., indent=4)`)."""
    return json.dumps(data, indent=4)


def write_source_layout(result: dict, out: Path) -> list[str]:
    """The notebook's result files under out/results/, names and formats as the source's."""
    tensors = result["tensors"]
    files = {
        "accuracy_per_layer/values.json": {n: t["accuracy"] for n, t in tensors.items()},
        "layer_comparison_full_gradient/values.json": {n: t["layer_vs_full"] for n, t in tensors.items()},
        "parameters_per_layer/values.json": {n: t["params"] for n, t in tensors.items()},
    }
    written = []
    for rel, values in files.items():
        path = out / "results" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(path, dump4(values))
        written.append(f"results/{rel}")
    for p, cands in result["divergent_samples"].items():
        path = out / "results" / "self_similarity_over_layers" / p / "gradient_similarities_over_layers.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(path, io.csv_text(["layer", *[f"{p} <=> {o}" for o in cands]],
                                        ([short_name(name), *[repr(float(v[i])) for v in cands.values()]]
                                         for i, name in enumerate(tensors))))
        written.append(str(path.relative_to(out)))
    return written


def compare_with_source(result: dict, src: SourceResults) -> dict:
    """The source's published per-tensor values next to ours: {tensor: {source_accuracy, ...}} and summary
    figures (tensors matched, largest differences, the source's divergent samples)."""
    acc = read_values(src.path("accuracy_per_layer"))
    lvf = read_values(src.path("layer_comparison_full_gradient"))
    params = read_values(src.path("parameters_per_layer")) if src.path("parameters_per_layer").is_file() else {}
    ours = result["tensors"]
    rows = {}
    for name, t in ours.items():
        row = {}
        if name in acc:
            row |= {"source_accuracy": float(acc[name]), "accuracy_diff": t["accuracy"] - float(acc[name])}
        if name in lvf:
            row |= {"source_layer_vs_full": float(lvf[name]), "layer_vs_full_diff": t["layer_vs_full"] - float(lvf[name])}
        if name in params:
            row["source_params"] = int(params[name])
        rows[name] = row
    matched = [n for n, r in rows.items() if "source_accuracy" in r]
    out = {"tensors": rows, "matched": len(matched), "source_tensors": len(acc),
           "unmatched_source_tensors": sorted(set(acc) - set(ours)), "unmatched_tensors": sorted(set(ours) - set(acc))}
    if matched:
        out["max_abs_diff_accuracy"] = max(abs(rows[n]["accuracy_diff"]) for n in matched)
        lv = [abs(r["layer_vs_full_diff"]) for r in rows.values() if "layer_vs_full_diff" in r]
        out["max_abs_diff_layer_vs_full"] = max(lv) if lv else None
        out["params_match"] = all(rows[n].get("source_params", ours[n]["params"]) == ours[n]["params"] for n in matched)
    sdir = src.self_similarity_dir()
    out["source_divergent_samples"] = sorted(p.name for p in sdir.iterdir() if p.is_dir()) if sdir.is_dir() else []
    diffs = []
    for p, cands in result["divergent_samples"].items():
        path = sdir / p / "gradient_similarities_over_layers.csv"
        if not path.is_file():
            continue
        with open(path) as f:
            table = list(csv.reader(f))
        header, body = table[0][1:], table[1:]
        for j, col in enumerate(header):
            o = col.split(" <=> ")[-1]
            if o in cands and len(body) == len(cands[o]):
                diffs += [abs(float(r[j + 1]) - v) for r, v in zip(body, cands[o], strict=True)]
    out["max_abs_diff_self_similarity"] = max(diffs) if diffs else None
    return out


# ----------------------------------------------------------------------------------------------- outputs

def per_tensor_csv(result: dict, compared: dict | None) -> str:
    cols = ["tensor", "component", "depth", "params", "percent_params", "accuracy", "layer_vs_full",
            "pearson_vs_full", "spearman_vs_full"]
    extra = ["source_accuracy", "accuracy_diff", "source_layer_vs_full", "layer_vs_full_diff"] if compared else []
    rows = []
    for name, t in result["tensors"].items():
        src = compared["tensors"].get(name, {}) if compared else {}
        rows.append([name] + [t[c] for c in cols[1:]] + [src.get(c, "") for c in extra])
    return io.csv_text(cols + extra, rows)


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tensors = result["tensors"]
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    def baselines(ax):
        ax.axhline(result["accuracy_bm25"], color="tab:red", linestyle="--", label=f"BM25 ({result['accuracy_bm25']:.3f})")
        ax.axhline(result["accuracy_full"], color="tab:green", linestyle=":",
                   label=f"full gradient ({result['accuracy_full']:.3f})")

    # cell 15: bars in depth order (Embed, 1, 2, ...), coloured by component
    order = sorted(tensors, key=lambda n: (-1 if tensors[n]["depth"] is None else tensors[n]["depth"],
                                           tensors[n]["component"], n))
    comps = sorted({tensors[n]["component"] for n in order})
    colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(comps)}

    def depth_bars(key, ylabel, title, name, log=False, lines=False):
        fig, ax = plt.subplots(figsize=(max(8, 0.14 * len(order)), 4.5))
        ax.bar(range(len(order)), [tensors[n][key] for n in order], width=1.0,
               color=[colour[tensors[n]["component"]] for n in order])
        labels = ["Embed" if tensors[n]["depth"] == 0 else ("other" if tensors[n]["depth"] is None else str(tensors[n]["depth"]))
                  for n in order]
        starts = [i for i, lab in enumerate(labels) if i == 0 or lab != labels[i - 1]]
        centres = [(a + b - 1) / 2 for a, b in zip(starts, [*starts[1:], len(labels)], strict=True)]
        ax.set_xticks(centres, [labels[i] for i in starts], fontsize=7)
        handles = [Patch(color=colour[c], label=c) for c in comps]
        if log:
            ax.set_yscale("log")
        if lines:
            baselines(ax)
        ax.set_xlabel("layer depth")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, ncol=2, frameon=False)
        save(fig, name)

    depth_bars("accuracy", "top-1 accuracy", "Accuracy per parameter tensor", "accuracy_per_tensor.png", lines=True)
    depth_bars("layer_vs_full", "uncentred cosine with full-gradient similarities", "Layer vs full gradient",
               "layer_vs_full.png")
    depth_bars("params", "parameters", "Parameters per tensor", "parameters_per_tensor.png", log=True)

    # cells 17 and 20: greedy curves with the projections as points
    proj = result["projection"]
    reds = plt.get_cmap("Reds")(np.linspace(0.3, 1, max(1, len(proj))))
    fig, ax = plt.subplots(figsize=(7, 4))
    g = result["greedy_similarity"]
    ax.plot([s["percent_params"] for s in g], [s["similarity"] for s in g], label="greedy (similarity)")
    for (label, pt), c in zip(proj.items(), reds, strict=False):
        ax.plot(pt["percent_params"], pt["vs_full"], "o", color=c, label=f"{label}: {pt['dims']} dims random projected")
    ax.axhline(1.0, color="r", linestyle="--", label="full gradient (all parameters)")
    ax.set_xlabel("% of model parameters (cumulative)")
    ax.set_ylabel("similarity to the full-gradient similarities")
    ax.legend(fontsize=8)
    save(fig, "greedy_similarity.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    g = result["greedy_accuracy"]
    ax.plot([s["percent_params"] for s in g], [s["accuracy"] for s in g], label="greedy (accuracy)")
    ax.axhline(result["accuracy_full"], color="r", linestyle="--", label="full gradient (all parameters)")
    for (label, pt), c in zip(proj.items(), reds, strict=False):
        ax.scatter([pt["percent_params"]], [pt["accuracy"]], color=c, label=f"{label}: {pt['dims']} dims random projected")
    ax.set_xlabel("% of model parameters (cumulative)")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8)
    save(fig, "greedy_accuracy.png")

    # cell 22 (accuracy) and scripts/line_plot_*.py (both): attention vs MLP over depth, and their sub-components
    for key, prefix, ylabel in (("accuracy", "", "top-1 accuracy"),
                                ("layer_vs_full", "layer_vs_full_", "similarity to the full gradient")):
        by_depth: dict[str, dict[int, float]] = {c: {} for c in (*ATTENTION, *MLP)}
        for t in tensors.values():
            if t["component"] in by_depth and t["depth"]:
                by_depth[t["component"]][t["depth"]] = t[key]
        depths = sorted({d for s in by_depth.values() for d in s})
        if not depths:
            continue

        def mean_of(group, d, by_depth=by_depth):
            vals = [by_depth[c][d] for c in group if d in by_depth[c]]
            return float(np.mean(vals)) if vals else np.nan

        for name, groups in (("attention_vs_mlp.png", {"self_attn": ATTENTION, "mlp": MLP}),
                             ("attention_components.png", {c: (c,) for c in ATTENTION}),
                             ("mlp_components.png", {c: (c,) for c in MLP})):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for label, group in groups.items():
                ax.plot(depths, [mean_of(group, d) for d in depths], marker=".", label=label)
            ax.set_xlabel("layer depth")
            ax.set_ylabel(ylabel)
            ax.grid(True)
            ax.legend()
            save(fig, prefix + name)

    # cell 21: accuracy grouped by the tensors' parameter counts
    groups: dict[int, list[float]] = {}
    for t in tensors.values():
        groups.setdefault(t["params"], []).append(t["accuracy"])
    counts = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(counts)), 4))
    ax.boxplot([groups[c] for c in counts], tick_labels=[f"{c:,}" for c in counts], showmeans=True)
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("top-1 accuracy")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    save(fig, "accuracy_by_parameter_count.png")

    comp = result["components"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(comp), [c["accuracy_mean"] for c in comp.values()])
    ax.set_ylabel("mean top-1 accuracy of its tensors")
    ax.set_title("Accuracy per component")
    baselines(ax)
    ax.legend(loc="lower right")
    save(fig, "accuracy_per_component.png")

    # cell 16: per-tensor similarities of the most divergent samples with their candidates
    for p, cands in result["divergent_samples"].items():
        fig, ax = plt.subplots(figsize=(max(8, 0.14 * len(tensors)), 4.5))
        for o, values in cands.items():
            ax.plot(range(len(values)), values, label=f"{p} <=> {o}", linewidth=2.5 if o == p else 1.2)
        ax.set_xticks(range(len(tensors)), [short_name(n) for n in tensors], rotation=90, fontsize=5)
        ax.set_ylabel("gradient similarity")
        ax.set_title(f"{p}: similarity with its candidates, per tensor")
        ax.legend(fontsize=7)
        save(fig, f"self_similarity_{re.sub(r'[^A-Za-z0-9_.-]', '_', p)}.png")
    return files


def report(result: dict, plots: list[str], compared: dict | None) -> str:
    lines = ["# Gradient similarity: layer analysis", "",
             f"{result['samples']} variants ({result['samples_with_original']} with their original among the "
             f"candidates), {result['pairs']} pairs.", "",
             "| method | top-1 accuracy |", "|---|---|",
             f"| BM25 (first candidate) | {result['accuracy_bm25']:.4f} |",
             f"| full gradient cosine | {result['accuracy_full']:.4f} |"]
    lines += [f"| random projection {label} ({pt['dims']} dims) | {pt['accuracy']:.4f} |"
              for label, pt in result["projection"].items()]
    lines += ["", f"Highest candidate cosine: mean {result['mean_max_cosine']:.4f}, median {result['median_max_cosine']:.4f}.",
              f"Wrong decisions (full gradient): {', '.join(result['wrong_decisions']) or 'none'}.", "",
              "## Per component", "", "| component | tensors | % params | mean accuracy | mean layer vs full |",
              "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['tensors']} | {v['percent_params']:.2f} | {v['accuracy_mean']:.4f} | {v['layer_vs_full_mean']:.4f} |"
              for c, v in result["components"].items()]
    best = sorted(result["tensors"].items(), key=lambda kv: -kv[1]["accuracy"])[:10]
    lines += ["", "## Best tensors", "", "| tensor | % params | accuracy | layer vs full |", "|---|---|---|---|"]
    lines += [f"| {n} | {v['percent_params']:.2f} | {v['accuracy']:.4f} | {v['layer_vs_full']:.4f} |" for n, v in best]
    for key, score in (("greedy_similarity", "similarity"), ("greedy_accuracy", "accuracy")):
        lines += ["", f"## Greedy selection by {score} (first 10 steps)", "", f"| step | tensor | % params | {score} |",
                  "|---|---|---|---|"]
        lines += [f"| {i + 1} | {g['tensor']} | {g['percent_params']:.2f} | {g[score]:.4f} |"
                  for i, g in enumerate(result[key][:10])]
    lines += ["", f"Most divergent samples under {result['best_tensor']}: {', '.join(result['divergent_samples']) or 'none'}."]
    if compared:
        lines += ["", "## Against the source's published values", "",
                  f"{compared['matched']} of the source's {compared['source_tensors']} tensors matched by name; "
                  f"largest |difference|: accuracy {compared.get('max_abs_diff_accuracy')}, layer vs full "
                  f"{compared.get('max_abs_diff_layer_vs_full')}. The source's most divergent samples: "
                  f"{', '.join(compared['source_divergent_samples']) or 'none'}. Every tensor: `per_tensor.csv`."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def metrics(result: dict, compared: dict | None) -> dict:
    tensors = result["tensors"]
    acc = {n: t["accuracy"] for n, t in tensors.items()}
    lvf = {n: t["layer_vs_full"] for n, t in tensors.items()}
    out = {"samples": result["samples"], "pairs": result["pairs"], "tensors": len(tensors),
           "accuracy_full": result["accuracy_full"], "accuracy_bm25": result["accuracy_bm25"],
           "mean_max_cosine": result["mean_max_cosine"], "median_max_cosine": result["median_max_cosine"],
           "best_tensor": result["best_tensor"], "best_tensor_accuracy": max(acc.values()),
           "min_tensor_accuracy": min(acc.values()),
           "best_layer_vs_full_tensor": max(lvf, key=lvf.get), "best_layer_vs_full": max(lvf.values()),
           "min_layer_vs_full": min(lvf.values()),
           "greedy_similarity_first": result["greedy_similarity"][0]["similarity"],
           "greedy_accuracy_first": result["greedy_accuracy"][0]["accuracy"]}
    embed = [n for n, t in tensors.items() if t["depth"] == 0]
    if embed:
        out["embed_accuracy"] = acc[embed[0]]
    for c, v in result["components"].items():
        out[f"accuracy_mean_{c}"] = v["accuracy_mean"]
        out[f"layer_vs_full_mean_{c}"] = v["layer_vs_full_mean"]
    for label, pt in result["projection"].items():
        out[f"accuracy_{label}"] = pt["accuracy"]
        out[f"projected_vs_full_{label}"] = pt["vs_full"]
    if compared:
        out |= {f"source_{k}": compared.get(k) for k in ("matched", "max_abs_diff_accuracy",
                                                         "max_abs_diff_layer_vs_full", "max_abs_diff_self_similarity")}
    return out


def run(cfg: Config, ctx) -> dict:
    dots, p_ids, o_ids = load_dots(cfg, ctx)
    projected = load_projected(cfg, ctx, int(sum(dots.tensors.values())))
    result = analyse(dots, p_ids, o_ids, projected, cfg.divergent_samples)
    compared = compare_with_source(result, cfg.compare_with) if cfg.compare_with else None
    if compared:
        result["source_comparison"] = compared
    io.write_json(ctx.dir / "analysis.json", result)
    io.write_text(ctx.dir / "per_tensor.csv", per_tensor_csv(result, compared))
    write_source_layout(result, ctx.dir)
    plots = plot(result, ctx.dir)
    io.write_text(ctx.dir / "report.md", report(result, plots, compared))
    return metrics(result, compared)
