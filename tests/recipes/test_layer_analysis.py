"""layer-analysis against the source's notebook (analysis.ipynb @ e6ebdbe): the uncentred layer-vs-full cosine,
both greedy selections (checked against a plain re-computation of cells 11 and 18-19), the projection points,
the divergent samples, the source's file layout, and the published results themselves where they are present."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmrepro.gradients.dot_products import DotProducts
from llmrepro.recipes import layer_analysis

SOURCE = Path(__file__).parents[1] / "gradients" / "data" / "gs_source"
PUBLISHED = Path(os.environ.get("LLMREPRO_GS_REFERENCE", Path(__file__).parents[3] / "shared" / "data" / "reference"
                                / "gradient-similarity"))
MIRROR = Path(os.environ.get("LLMREPRO_GS_SOURCE_REPO", "/work/.mirror/lukas-hinterleitner+master-thesis/repo"))


def constructed(seed=0, n_p=6, k=4, names=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                             "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight")):
    """Random dot products of n_p variants x k candidates over 4 tensors; variant i's original is candidate i % k."""
    rng = np.random.default_rng(seed)
    dots = DotProducts({n: 10 * (i + 1) for i, n in enumerate(names)}, {p: [p * k + j for j in range(k)] for p in range(n_p)})
    p_ids = [f"s{p}" for p in range(n_p)]
    o_ids = [f"s{p}" if j == p % k else f"x{p}_{j}" for p in range(n_p) for j in range(k)]
    for p in range(n_p):
        dots.paraphrased[p] = rng.uniform(0.5, 2, len(names))
        for o in dots.candidates[p]:
            dots.original[o] = rng.uniform(0.5, 2, len(names))
            dots.pairs[(p, o)] = (rng.uniform(-1, 1, len(names)) * np.sqrt(dots.paraphrased[p] * dots.original[o]),
                                  dots.original[o])
    return dots, p_ids, o_ids


def nested(dots, p_ids, o_ids):
    """The notebook's layer_dot_products: {tensor: {p: {o: (D_po, D_pp, D_oo)}}} and the combined full cosines."""
    names = list(dots.tensors)
    triples = {t: {p_ids[p]: {o_ids[o]: (dots.pairs[(p, o)][0][i], dots.paraphrased[p][i], dots.pairs[(p, o)][1][i])
                              for o in c} for p, c in dots.candidates.items()} for i, t in enumerate(names)}
    full = {p_ids[p]: {o_ids[o]: sum(dots.pairs[(p, o)][0]) / (math.sqrt(sum(dots.paraphrased[p])) *
                                                              math.sqrt(sum(dots.pairs[(p, o)][1])))
                       for o in c} for p, c in dots.candidates.items()}
    return names, triples, full


def ucos(a, b, eps=0.0):
    return sum(x * y for x, y in zip(a, b, strict=True)) / ((math.sqrt(sum(x * x for x in a)) + eps) * (math.sqrt(sum(y * y for y in b)) + eps))


def loop_greedy_similarity(names, triples, full):
    """Cell 11, written as loops; the remaining tensors are visited in model order (the source: set order)."""
    pairs = [(p, o) for p in full for o in full[p]]
    target = [full[p][o] for p, o in pairs]
    acc = {(p, o): (0.0, 0.0, 0.0) for p, o in pairs}
    remaining, out = list(names), []
    while remaining:
        best, best_rho = None, -math.inf
        for t in remaining:
            c_hat = []
            for p, o in pairs:
                dij, dii, djj = (a + b for a, b in zip(acc[(p, o)], triples[t][p][o], strict=True))
                denom = math.sqrt(dii) * math.sqrt(djj)
                c_hat.append(dij / (denom + 1e-12) if denom > 0 else 0.0)
            rho = ucos(c_hat, target, 1e-12)
            if rho > best_rho:
                best, best_rho = t, rho
        acc = {(p, o): tuple(a + b for a, b in zip(acc[(p, o)], triples[best][p][o], strict=True)) for p, o in pairs}
        remaining.remove(best)
        out.append((best, best_rho))
    return out


def loop_greedy_accuracy(names, triples, full):
    """Cells 18-19 as loops (best_score starts at -1.0; a variant with no similarity above it is not counted)."""
    acc = {p: {o: (0.0, 0.0, 0.0) for o in full[p]} for p in full}
    remaining, out = list(names), []
    while remaining:
        best, best_acc, best_new = None, -1.0, None
        for t in remaining:
            new = {p: {o: tuple(a + b for a, b in zip(acc[p][o], triples[t][p][o], strict=True)) for o in acc[p]} for p in acc}
            correct = total = 0
            for p, om in new.items():
                best_o, best_s = None, -1.0
                for o, (dij, dii, djj) in om.items():
                    denom = (dii * djj) ** 0.5
                    s = -math.inf if denom <= 1e-12 else dij / max(denom, 1e-12)
                    if s > best_s:
                        best_s, best_o = s, o
                if best_o is not None:
                    correct, total = correct + (best_o == p), total + 1
            a = correct / total if total else 0.0
            if a > best_acc:
                best, best_acc, best_new = t, a, new
        acc = best_new
        remaining.remove(best)
        out.append((best, best_acc))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_vs_full_and_greedy_selections_equal_the_notebooks_definitions(seed):
    dots, p_ids, o_ids = constructed(seed)
    names, triples, full = nested(dots, p_ids, o_ids)
    result = layer_analysis.analyse(dots, p_ids, o_ids)
    flat_full = [v for p in full for v in full[p].values()]
    for t in names:
        per = [dij / (math.sqrt(dii) * math.sqrt(djj)) for p in triples[t] for dij, dii, djj in triples[t][p].values()]
        assert result["tensors"][t]["layer_vs_full"] == pytest.approx(ucos(per, flat_full), rel=1e-12)  # cell 9
        right = sum(max(triples[t][p], key=lambda o: triples[t][p][o][0] / math.sqrt(triples[t][p][o][1] * triples[t][p][o][2])) == p  # noqa: B023
                    for p in triples[t])
        assert result["tensors"][t]["accuracy"] == pytest.approx(right / len(p_ids))  # cell 6
    sim = [(g["tensor"], g["similarity"]) for g in result["greedy_similarity"]]
    assert [t for t, _ in sim] == [t for t, _ in loop_greedy_similarity(names, triples, full)]
    np.testing.assert_allclose([s for _, s in sim], [s for _, s in loop_greedy_similarity(names, triples, full)], rtol=1e-10)
    acc, ref = [(g["tensor"], g["accuracy"]) for g in result["greedy_accuracy"]], loop_greedy_accuracy(names, triples, full)
    assert [t for t, _ in acc] == [t for t, _ in ref] and [a for _, a in acc] == pytest.approx([a for _, a in ref])
    sizes = np.array([dots.tensors[t] for t in names], dtype=float)
    assert result["greedy_similarity"][-1]["percent_params"] == pytest.approx(100.0)
    first = names.index(sim[0][0])
    assert result["greedy_similarity"][0]["percent_params"] == pytest.approx(100 * sizes[first] / sizes.sum())


def test_divergent_samples_and_projection_points_as_the_notebook():
    dots, p_ids, o_ids = constructed(3)
    names, triples, full = nested(dots, p_ids, o_ids)
    projected = {"1pct": (40, {p: {o: v * 0.5 + 0.01 * len(o) for o, v in om.items()} for p, om in full.items()})}
    result = layer_analysis.analyse(dots, p_ids, o_ids, projected, divergent=2)
    best = result["best_tensor"]
    accs = {t: v["accuracy"] for t, v in result["tensors"].items()}
    assert best == max(accs, key=accs.get)  # the first maximum in model order (max over the dict)
    per_sample = {p: ucos([dij / math.sqrt(dii * djj) for dij, dii, djj in triples[best][p].values()], list(full[p].values()))
                  for p in full}
    assert list(result["divergent_samples"]) == sorted(per_sample, key=per_sample.get)[:2]  # cell 12
    p = next(iter(result["divergent_samples"]))
    o = next(iter(full[p]))
    assert result["divergent_samples"][p][o] == pytest.approx(
        [triples[t][p][o][0] / math.sqrt(triples[t][p][o][1] * triples[t][p][o][2]) for t in names])  # cell 16
    proj = [v for om in projected["1pct"][1].values() for v in om.values()]
    point = result["projection"]["1pct"]
    assert point["vs_full"] == pytest.approx(ucos(proj, [v for om in full.values() for v in om.values()]))  # cell 10
    assert point["percent_params"] == pytest.approx(100 * 40 / 100)  # dims / parameters (10+20+30+40)
    right = sum(max(projected["1pct"][1][p], key=projected["1pct"][1][p].get) == p for p in full)
    assert point["accuracy"] == pytest.approx(right / len(full))  # cell 20


def test_source_files_in_the_source_layout_are_analysed_and_compared_line_by_line(cli, tmp_path):
    """The small source-layout fixture: partitioned dot-product files, projected similarities and the published
    values.json / CSV computed from them with plain loops; reading them back must give no difference."""
    d = SOURCE / "data/dot_products/paraphrased/tiny/model/sample_size/full"
    args = ["run", "similarity/layer-analysis-paraphrased", "--profile", "smoke", "--output-dir", str(tmp_path),
            "dot_products=[]", "projected=[]", "divergent_samples=1",
            f"source_dot_products={{files: [{d}], parameters: {SOURCE}/results/parameters_per_layer/tiny/model/values.json}}",
            f"source_projected={SOURCE}/data/gradient_similarity/random_projection/paraphrased/tiny/model/sample_size_full.json",
            f"compare_with={{root: {SOURCE}, setting: paraphrased, model: tiny/model}}"]
    code, _, err = cli(*args)
    assert code == 0, err
    run = next((tmp_path / "similarity" / "layer-analysis-paraphrased").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["source_matched"] == 3 and metrics["source_max_abs_diff_accuracy"] == 0.0
    assert metrics["source_max_abs_diff_layer_vs_full"] < 1e-12 and metrics["source_max_abs_diff_self_similarity"] < 1e-12
    assert (metrics["accuracy_full"], metrics["accuracy_bm25"], metrics["samples"]) == (1.0, pytest.approx(1 / 3), 3)
    assert metrics["accuracy_20pct"] == 1.0  # 4 dims of the 20 parameters, named as the notebook's round(x)%
    proj = json.loads((SOURCE / "data/gradient_similarity/random_projection/paraphrased/tiny/model/sample_size_full.json"
                       ).read_text())["4"]
    assert metrics["projected_vs_full_20pct"] > 0.99 and len(proj) == 3
    for rel in ("accuracy_per_layer", "layer_comparison_full_gradient"):
        ours = json.loads((run / "results" / rel / "values.json").read_text())
        theirs = json.loads((SOURCE / "results" / rel / "paraphrased/tiny/model/sample_size/full/values.json").read_text())
        assert list(ours) == list(theirs) and ours == pytest.approx(theirs, abs=1e-15)
    assert (run / "results/parameters_per_layer/values.json").read_text() == \
        json.dumps(json.loads((SOURCE / "results/parameters_per_layer/tiny/model/values.json").read_text()), indent=4)
    csv_name = "self_similarity_over_layers/lima_2/gradient_similarities_over_layers.csv"
    assert (run / "results" / csv_name).read_text() == \
        (SOURCE / "results/self_similarity_over_layers/paraphrased/tiny/model/lima_2/gradient_similarities_over_layers.csv").read_text()
    table = (run / "per_tensor.csv").read_text().splitlines()
    assert table[0].endswith("source_accuracy,accuracy_diff,source_layer_vs_full,layer_vs_full_diff")
    assert table[1].startswith("model.embed_tokens.weight,embed,0,10,")


def test_smoke_layer_analysis_writes_report_plots_and_the_source_layout(cli, tmp_path):
    args = ("--profile", "smoke", "--output-dir", str(tmp_path))
    code, _, err = cli("run", "similarity/layer-analysis-paraphrased", *args)
    assert code == 2 and "needs similarity/dot-products-paraphrased (profile smoke): no finished run at" in err
    assert "run `llmrepro run similarity/dot-products-paraphrased --profile smoke` first" in err
    assert cli("run", "similarity/dot-products-paraphrased", *args)[0] == 0
    assert cli("run", "similarity/gradient-similarity-paraphrased-projected", *args)[0] == 0
    code, out, err = cli("run", "similarity/layer-analysis-paraphrased", *args)
    assert code == 0, err
    run = next((tmp_path / "similarity" / "layer-analysis-paraphrased").iterdir())
    plots = ["accuracy_per_tensor.png", "layer_vs_full.png", "parameters_per_tensor.png", "greedy_similarity.png",
             "greedy_accuracy.png", "attention_vs_mlp.png", "attention_components.png", "mlp_components.png",
             "accuracy_by_parameter_count.png", "accuracy_per_component.png", "layer_vs_full_attention_vs_mlp.png"]
    for name in plots:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert all(f"![{p}]({p})" in report for p in plots) and "| BM25 (first candidate) |" in report
    analysis = json.loads((run / "analysis.json").read_text())
    assert analysis["samples"] == 12 and len(analysis["greedy_accuracy"]) == len(analysis["tensors"]) == 21
    assert list(analysis["projection"]) == ["1pct", "5pct"] and len(analysis["divergent_samples"]) == 3
    for p in analysis["divergent_samples"]:
        assert (run / f"self_similarity_{p}.png").is_file()
        csv = (run / "results/self_similarity_over_layers" / p / "gradient_similarities_over_layers.csv").read_text()
        assert csv.splitlines()[0].startswith(f"layer,{p} <=> ") and csv.splitlines()[1].startswith("embed_tokens,")
    values = json.loads((run / "results/accuracy_per_layer/values.json").read_text())
    assert values == {n: t["accuracy"] for n, t in analysis["tensors"].items()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reference"]["accuracy_full"]["published"] == pytest.approx(0.992914979757085)


def _mirror_partials(commit: str, setting: str, out: Path) -> Path:
    d = f"data/dot_products/{setting}/amd/AMD-OLMo-1B-SFT/sample_size/full"
    listing = subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "-r", commit, "--", d], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    out.mkdir(parents=True)
    for line in listing:
        meta, path = line.split("\t")
        if "_part_" in path:
            blob = subprocess.run(["git", "-C", str(MIRROR), "cat-file", "blob", meta.split()[2]], capture_output=True,
                                  check=True).stdout
            (out / Path(path).name).write_bytes(blob)
    return out


@pytest.mark.skipif(not (PUBLISHED / "results").is_dir() or not MIRROR.is_dir(),
                    reason="needs the source's published results and its repository (with the dot-product partitions)")
@pytest.mark.parametrize("setting, commit", [("paraphrased", "c726c9f"), ("model_generated", "6f0aecd")])
def test_the_source_dot_products_reproduce_its_published_layer_analysis(cli, tmp_path, setting, commit):
    """Opt-in: the source's own dot products (partition files in its history) through our layer-analysis give its
    published accuracy_per_layer exactly and layer_comparison_full_gradient to 1e-8."""
    parts = _mirror_partials(commit, setting, tmp_path / "parts")
    name = setting.replace("_", "-")
    model = "amd/AMD-OLMo-1B-SFT"
    code, _, err = cli("run", f"similarity/layer-analysis-{name}", "--output-dir", str(tmp_path / "out"),
                       "dot_products=[]", "projected=[]",
                       f"source_dot_products={{files: [{parts}], parameters: {PUBLISHED}/results/parameters_per_layer/{model}/values.json}}",
                       f"source_projected={PUBLISHED}/data/gradient_similarity/random_projection/{setting}/{model}/sample_size_full.json",
                       f"compare_with={{root: {PUBLISHED}, setting: {setting}}}")
    assert code == 0, err
    run = next((tmp_path / "out" / "similarity" / f"layer-analysis-{name}").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["source_matched"] == 113 and metrics["source_max_abs_diff_accuracy"] == 0.0
    assert metrics["source_max_abs_diff_layer_vs_full"] < 1e-8 and metrics["source_max_abs_diff_self_similarity"] < 1e-6
    assert all(r["match"] for r in metrics["reference"].values()), {k: r for k, r in metrics["reference"].items() if not r["match"]}
    analysis = json.loads((run / "analysis.json").read_text())
    assert sorted(analysis["divergent_samples"]) == analysis["source_comparison"]["source_divergent_samples"]


@pytest.mark.skipif(not (PUBLISHED / "data").is_dir(), reason="needs the source's published data (shared copy)")
def test_reference_figures_recompute_from_the_published_files():
    """The experiments' reference values, recomputed with our readers and scores from the source's files."""
    from llmrepro.core import catalog
    from llmrepro.gradients import similarity

    def scores(sims):
        best = [max(c, key=c.get) for c in sims.values()]
        top = [max(c.values()) for c in sims.values()]
        return {"accuracy": np.mean([b == p for b, p in zip(best, sims, strict=True)]),
                "bm25_accuracy": np.mean([next(iter(c)) == p for p, c in sims.items()]),
                "mean_max_cosine": np.mean(top), "median_max_cosine": np.median(top), "samples": len(sims),
                "pairs": sum(map(len, sims.values()))}

    def refs(name):
        return {r.metric: r.value for r in catalog.load(name).spec.reference}

    model = "amd/AMD-OLMo-1B-SFT"
    full = similarity.read_similarities(PUBLISHED / f"data/gradient_similarity/paraphrased/{model}/sample_size_full.json")
    for metric, value in refs("similarity/gradient-similarity-paraphrased").items():
        assert scores(full)[metric] == pytest.approx(value, abs=1e-12), metric
    for setting in ("paraphrased", "model-generated"):
        proj = similarity.read_similarities(PUBLISHED / f"data/gradient_similarity/random_projection/{setting.replace('-', '_')}"
                                            f"/{model}/sample_size_full.json")
        expected = refs(f"similarity/gradient-similarity-{setting}-projected")
        for dim, label in zip(sorted(proj, key=int), ("1pct", "5pct"), strict=True):
            assert expected[f"dims_{label}"] == int(dim)
            for metric in ("accuracy", "mean_max_cosine", "median_max_cosine"):
                assert scores(proj[dim])[metric] == pytest.approx(expected[f"{metric}_{label}"], abs=1e-12)
            assert scores(proj[dim])["bm25_accuracy"] == pytest.approx(expected["bm25_accuracy"], abs=1e-12)
