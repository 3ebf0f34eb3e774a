"""layer-dot-products: per parameter tensor, the dot products p.o, p.p and o.o of variants and their BM25
candidate originals, from which layer-analysis derives per-layer and full cosines.

Reproduces the gradient-similarity project's dot-product computation (lukas-hinterleitner/master-thesis @
e6ebdbe, `src/computation.py` `__calculate_layerwise_dot_products`): same originals, variants, candidates,
tokenisation and loss as gradient-similarity. Output `dot_products.json`: the source's three dicts under
`dot_products` (`{p: {o: {tensor: p.o}}}`), `paraphrased_dot_products` (`{p: {tensor: p.p}}`) and
`original_dot_products` (`{o: {tensor: o.o}}`), plus `tensors` (parameter counts) and `candidates` (BM25
order). Partition outputs merge with `llmrepro.gradients.similarity.merge`, or are read together by
layer-analysis. Metrics as gradient-similarity's (accuracy of the full cosine and of BM25), and how the
numbers were computed (`method`; with `method: ghost` the tensors done as ghost dot products, `ghost_layers`,
and the sample length the rule used, `ghost_max_tokens`).

Added: `projections` ({name: projection}) projects every tensor's gradient as well (the source's dense
projection, the factored one, ...) from the same gradient computation, and compares each projection with
the full gradient per tensor and overall (`projections.csv`, `projections.md`, metrics with a `_<name>_<pct>`
suffix): top-1 accuracy per tensor and of the concatenation, and the agreement of the projected
similarities with the full-gradient ones (the uncentred cosine of the notebook's layer-vs-full and its cell
10, and Spearman's rho over all pairs).

Deliberate differences from the source:
- streamed (see `llmrepro.gradients.dot_products`) instead of recomputing every candidate's gradient one
  sample at a time; dot products are float32 matrix products accumulated per tensor and stored as float64
  (the source: `.item()` of a float32 GPU dot per tensor and pair); `method: hooks | ghost` builds the
  gradients from captured layer factors, or takes linear layers' dot products from them (equal up to float32
  rounding, `tests/gradients/test_ghost.py`);
- `original_dot_products` holds each original's first computed value, in original order (the source kept
  the first one per job and, merging 20 partition files, the last file's in glob order); the pairs keep the
  o.o computed next to them;
- eager attention (vmap), the tulu template forced, BM25 tie order: as gradient-similarity (the published
  paraphrased dot products, d2bb4d7, set the template only when the tokenizer had none).
"""

from __future__ import annotations

from pydantic import model_validator

from llmrepro.core import io
from llmrepro.gradients import pairs as pairs_
from llmrepro.gradients import similarity
from llmrepro.gradients.pairs import PairsConfig, ProjectionConfig


class Config(PairsConfig):
    projections: dict[str, ProjectionConfig] = {}  # also project, e.g. {dense: {...}, factored: {projector: factored}}

    @model_validator(mode="after")
    def _projection_names(self):
        bad = [n for n in self.projections if not n.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"projection names are letters, digits and _: {bad}")
        return self


# ------------------------------------------------------------------------------------ projections vs full

def compare(full, parts: dict, totals: dict[str, int], p_ids: list[str], o_ids: list[str]) -> dict:
    """Each projection against the full gradient: per tensor (accuracy, uncentred cosine of its similarities
    with the full tensor's) and overall (accuracy, same top-1 as the full gradient, uncentred cosine and
    Spearman's rho of the similarities over all pairs)."""
    from scipy import stats

    keys, po, pp, oo = full.matrices()
    f_all, f_per = similarity.cosines(po, pp, oo)
    truth = similarity.truth_positions(full, p_ids, o_ids)
    f_best = f_all.reshape(len(truth), -1).argmax(1)
    names = list(full.tensors)
    acc_full = similarity.top1_accuracy(f_per, truth)
    tensors = {n: {"component": similarity.component(n), "params": full.tensors[n],
                   "accuracy_full": float(acc_full[i])} for i, n in enumerate(names)}
    overall = {}
    for label, part in parts.items():
        pkeys, ppo, ppp, poo = part.matrices()
        assert pkeys == keys
        g_all, g_per = similarity.cosines(ppo, ppp, poo)
        acc = similarity.top1_accuracy(g_per, truth)
        for j, n in enumerate(part.tensors):
            i = names.index(n)
            tensors[n][label] = {"dims": part.tensors[n], "method": part.methods.get(n),
                                 "accuracy": float(acc[j]),
                                 "agreement": float(similarity.uncentred_cosine(g_per[:, j], f_per[:, i]))}
        overall[label] = {"dims": totals[label], "dims_used": int(sum(part.tensors.values())),
                          "accuracy": float(similarity.top1_accuracy(g_all, truth)),
                          "top1_agreement": float((g_all.reshape(len(truth), -1).argmax(1) == f_best).mean()),
                          "vs_full": float(similarity.uncentred_cosine(g_all, f_all)),
                          "spearman_vs_full": float(stats.spearmanr(g_all, f_all).statistic),
                          "factored_tensors": sum(m == "factored" for m in part.methods.values())}
    accuracy = float(similarity.top1_accuracy(f_all, truth))
    return {"accuracy_full": accuracy, "projections": overall, "tensors": tensors}


def per_tensor_csv(table: dict) -> str:
    labels = list(table["projections"])
    cols = ["tensor", "component", "params", "accuracy_full"]
    cols += [f"{c}_{label}" for label in labels for c in ("dims", "method", "accuracy", "agreement")]
    rows = []
    for n, t in table["tensors"].items():
        row = [n, t["component"], t["params"], t["accuracy_full"]]
        for label in labels:
            got = t.get(label, {})
            row += [got.get(c, "") for c in ("dims", "method", "accuracy", "agreement")]
        rows.append(row)
    return io.csv_text(cols, rows)


def report(table: dict) -> str:
    import numpy as np

    labels = list(table["projections"])
    lines = ["# Projected vs full gradients, per tensor and overall", "",
             f"Full gradient: top-1 accuracy {table['accuracy_full']:.4f}.", "",
             "| projection | dims (nominal) | dims used | accuracy | same top-1 as full | uncentred cosine with full "
             "| Spearman with full |", "|---|---|---|---|---|---|---|"]
    for label, o in table["projections"].items():
        lines.append(f"| {label} | {o['dims']:,} | {o['dims_used']:,} | {o['accuracy']:.4f} | {o['top1_agreement']:.4f} "
                     f"| {o['vs_full']:.5f} | {o['spearman_vs_full']:.4f} |")
    comps = list(dict.fromkeys(t["component"] for t in table["tensors"].values()))
    lines += ["", "## Mean per component: accuracy (full / " + " / ".join(labels) + ") and agreement with the full "
              "tensor's similarities", "", "| component | accuracy full | " + " | ".join(f"accuracy {x}" for x in labels)
              + " | " + " | ".join(f"agreement {x}" for x in labels) + " |", "|---|---|" + "---|" * (2 * len(labels))]
    for c in comps:
        ts = [t for t in table["tensors"].values() if t["component"] == c]
        mean = lambda key, label=None, ts=ts: np.mean([t[label][key] if label else t[key]  # noqa: E731
                                                      for t in ts if label is None or label in t])
        lines.append(f"| {c} | {mean('accuracy_full'):.4f} | " + " | ".join(f"{mean('accuracy', x):.4f}" for x in labels)
                     + " | " + " | ".join(f"{mean('agreement', x):.4f}" for x in labels) + " |")
    lines += ["", "Every tensor: `projections.csv`."]
    return "\n".join(lines) + "\n"


def comparison_metrics(table: dict) -> dict:
    import numpy as np

    out = {}
    for label, o in table["projections"].items():
        per = [t[label] for t in table["tensors"].values() if label in t]
        out |= {f"accuracy_{label}": o["accuracy"], f"top1_agreement_{label}": o["top1_agreement"],
                f"projected_vs_full_{label}": o["vs_full"], f"spearman_vs_full_{label}": o["spearman_vs_full"],
                f"dims_{label}": o["dims"], f"dims_used_{label}": o["dims_used"],
                f"tensor_accuracy_mean_{label}": float(np.mean([t["accuracy"] for t in per])),
                f"tensor_agreement_mean_{label}": float(np.mean([t["agreement"] for t in per])),
                f"tensor_agreement_min_{label}": float(np.min([t["agreement"] for t in per]))}
    return out


def run(cfg: Config, ctx) -> dict:
    import time

    from llmrepro.training import memory

    pairs = pairs_.load_pairs(cfg, ctx)
    memory.reset_peak()
    started = time.perf_counter()
    dots, totals = pairs_.compute_dot_products(cfg, pairs, ctx, projections=cfg.projections or None)
    seconds = time.perf_counter() - started
    full = dots.unlabelled()
    io.write_json(ctx.dir / "dot_products.json", similarity.dots_json(full, pairs.p_ids, pairs.o_ids))
    metrics = {**similarity.summary(full, pairs.p_ids, pairs.o_ids), "tensors": len(full.tensors),
               **pairs_.method_metrics(cfg, full)}
    if totals:
        table = compare(full, {label: dots.part(label) for label in totals}, totals, pairs.p_ids, pairs.o_ids)
        io.write_text(ctx.dir / "projections.csv", per_tensor_csv(table))
        io.write_text(ctx.dir / "projections.md", report(table))
        io.write_json(ctx.dir / "projections.json", table)
        metrics |= comparison_metrics(table)
    return {**metrics, "samples_per_s": len(full.candidates) / seconds, "peak_memory_mb": memory.peak_mb()}
