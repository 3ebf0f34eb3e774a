"""Gradient similarity (issue 5): streamed dot products vs stored full gradients, partitions, analysis, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmrepro.core.context import RunContext
from llmrepro.gradients import candidates, dot_products, pairs, similarity
from llmrepro.gradients.dot_products import DotProducts
from llmrepro.gradients.pairs import PairsConfig
from llmrepro.recipes import layer_analysis

CFG = dict(model={"name": "tiny-llama", "attn_implementation": "eager"},
           data={"name": "fixture:lima", "format": "chat", "limit": 7}, top_k=3, max_length=96,
           chunk_size=3, batch_size=2)


def run_dots(tmp_path_factory, **overrides):
    cfg = PairsConfig.model_validate({**CFG, **overrides})
    ctx = RunContext(dir=tmp_path_factory.mktemp("fam") / "exp" / "run")
    loaded = pairs.load_pairs(cfg, ctx)
    return pairs.compute_dot_products(cfg, loaded, ctx), loaded


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run_dots(tmp_path_factory)


def full_gradients(rows: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The source's way: one sample at a time, model(...).loss (labels -100 outside the answer), backward, keep."""
    from llmrepro.gradients import encoding
    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

    mcfg = ModelConfig(**CFG["model"])
    tok, model = load_tokenizer(mcfg), load_model(mcfg).eval()
    out = []
    for row in rows:
        ex = encoding.encode(row, "chat", tok, "sft", CFG["max_length"])
        model.zero_grad()
        model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def test_layer_dot_products_equal_direct_computation_from_stored_gradients(whole):
    dots, pairs = whole
    gp, go = full_gradients(pairs.variants), full_gradients(pairs.originals)
    names = list(dots.tensors)
    assert names == list(gp[0]) and len(dots.pairs) == 7 * 3
    for (p, o), (d_po, d_oo) in dots.pairs.items():
        ref_po = np.array([float(gp[p][n].double().flatten() @ go[o][n].double().flatten()) for n in names])
        ref_oo = np.array([float(go[o][n].double().pow(2).sum()) for n in names])
        np.testing.assert_allclose(d_po, ref_po, rtol=1e-5, atol=1e-5 * np.abs(ref_po).max())
        np.testing.assert_allclose(d_oo, ref_oo, rtol=1e-5)
    for p, d_pp in dots.paraphrased.items():
        np.testing.assert_allclose(d_pp, [float(gp[p][n].double().pow(2).sum()) for n in names], rtol=1e-5)
    # full cosine = cosine of the concatenated gradients
    keys, po, pp, oo = dots.matrices()
    full, _ = similarity.cosines(po, pp, oo)
    p, o = keys[4]
    flat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    assert full[4] == pytest.approx(float(torch.nn.functional.cosine_similarity(flat(gp[p]), flat(go[o]), dim=0)), abs=1e-6)


def test_partitioned_run_merges_into_the_whole_run_exactly(whole, tmp_path_factory):
    dots, pairs = whole
    ids = pairs.p_ids, pairs.o_ids
    parts = [similarity.dots_json(run_dots(tmp_path_factory, partition_start=a, partition_end=b)[0], *ids) for a, b in [(0, 2), (2, 7)]]
    assert similarity.merge(parts) == similarity.dots_json(dots, *ids)  # bit for bit, edges mid-chunk
    with pytest.raises(Exception, match="partitions overlap"):
        similarity.merge([parts[1], parts[1]])


def test_bm25_candidates_force_the_true_original_into_the_last_slot():
    corpus = ["red apple pie", "green apple tart", "blue sky", "apple juice", "plain water"]
    assert candidates.bm25_candidates(["apple pie"], corpus, [0], k=3)[0][0] == 0
    top = candidates.bm25_candidates(["apple"], corpus, [4], k=3)[0]
    assert top[-1] == 4 and set(top[:2]) <= {0, 1, 3}


def test_projection_dims_and_seeds():
    sizes = {"a": 1000, "b": 300, "c": 7}
    assert sum(dot_products.split_dims(sizes, 130).values()) == 130
    assert dot_products.split_dims(sizes, 1024, multiple=512) == {"a": 1024}
    assert dot_products.projection_total(1_000_000, 0.01) == 10240
    code = "from llmrepro.gradients.dot_products import tensor_seed; print(tensor_seed('model.layers.0.mlp.up_proj.weight', 42))"
    seeds = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": s}, capture_output=True,
                            text=True).stdout for s in ("1", "2")}
    assert len(seeds) == 1 and seeds.pop().strip() == str(dot_products.tensor_seed("model.layers.0.mlp.up_proj.weight", 42))


def test_accuracy_per_layer_on_a_constructed_case():
    """3 samples x 3 candidates, 2 tensors: 'q_proj' always points at the true original, 'up_proj' always at the
    first candidate, which is the truth for sample 0 only. BM25 ranks the truth first for sample 0 only."""
    truth_slot = [0, 2, 1]
    dots = DotProducts({"model.layers.0.self_attn.q_proj.weight": 10, "model.layers.0.mlp.up_proj.weight": 30},
                       {p: [3 * p + j for j in range(3)] for p in range(3)})
    for p in range(3):
        dots.paraphrased[p] = np.array([1.0, 1.0])
        for j, o in enumerate(dots.candidates[p]):
            q = 0.9 if j == truth_slot[p] else 0.1
            up = 0.8 if j == 0 else 0.2
            dots.pairs[(p, o)] = (np.array([q, up]), np.array([1.0, 1.0]))
            dots.original[o] = np.array([1.0, 1.0])
    p_ids = ["s0", "s1", "s2"]
    o_ids = [f"s{p}" if j == truth_slot[p] else f"x{p}{j}" for p in range(3) for j in range(3)]
    result = layer_analysis.analyse(dots, p_ids, o_ids)
    assert result["accuracy_bm25"] == pytest.approx(1 / 3)
    assert result["tensors"]["model.layers.0.self_attn.q_proj.weight"]["accuracy"] == 1.0
    assert result["tensors"]["model.layers.0.mlp.up_proj.weight"]["accuracy"] == pytest.approx(1 / 3)
    assert result["components"]["q"]["accuracy_mean"] == 1.0 and result["components"]["up"]["percent_params"] == 75.0
    assert result["greedy"][0] == {"tensor": "model.layers.0.self_attn.q_proj.weight", "accuracy": 1.0,
                                   "percent_params": 25.0}
    assert result["self_similarity_full"] == pytest.approx(np.mean([(0.9 + 0.8) / 2, (0.9 + 0.2) / 2, (0.9 + 0.2) / 2]))


@pytest.mark.parametrize("args, message", [
    (["similarity/gradient-similarity-paraphrased", "partition_start=5", "partition_end=2"],
     "partition_end (2) must be greater than partition_start (5)"),
    (["similarity/gradient-similarity-paraphrased", "partition_start=500"], "partition_start=500 is past the last"),
    (["similarity/gradient-similarity-paraphrased", "variants.run_dir=/nonexistent"],
     "needs /nonexistent: no finished run at /nonexistent"),
    (["similarity/gradient-similarity-paraphrased", "top_k=50"], "top_k=50 is larger than the 12 originals"),
    (["similarity/model-generated-lima", "paraphrase_rules=false"], "kind=model-generated needs `model`"),
    (["similarity/layer-analysis-paraphrased", "dot_products=[]"], "params.dot_products: List should have at least 1"),
    (["similarity/layer-analysis-paraphrased", "dot_products=[{experiment: instruct/dolly-pythia-2.8b}]"],
     "instruct/dolly-pythia-2.8b runs recipe instruct-sft, not layer-dot-products"),
    (["similarity/paraphrased-lima", "generator.backend=openai", "generator.api_key_env=LLMREPRO_NO_SUCH_KEY"],
     "needs an API key in $LLMREPRO_NO_SUCH_KEY"),
])
def test_bad_inputs_fail_with_one_line(cli, tmp_path, args, message):
    code, _, err = cli("run", args[0], "--profile", "smoke", "--output-dir", str(tmp_path), *args[1:])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.rglob("*.partial"))


def test_smoke_layer_analysis_writes_report_and_plots(cli, tmp_path):
    args = ("--profile", "smoke", "--output-dir", str(tmp_path))
    code, _, err = cli("run", "similarity/layer-analysis-paraphrased", *args)
    assert code == 2 and "needs similarity/dot-products-paraphrased (profile smoke): no finished run at" in err
    assert "run `llmrepro run similarity/dot-products-paraphrased --profile smoke` first" in err
    assert cli("run", "similarity/dot-products-paraphrased", *args)[0] == 0
    code, out, _ = cli("run", "similarity/layer-analysis-paraphrased", *args)
    assert code == 0
    run_dir = tmp_path / "similarity" / "layer-analysis-paraphrased"
    run_dir = next(run_dir.iterdir())
    plots = ["accuracy_per_tensor.png", "accuracy_per_component.png", "greedy_selection.png",
             "correlation_vs_full.png", "parameters_per_layer.png"]
    for name in plots:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert all(f"![{p}]({p})" in report for p in plots) and "| BM25 (first candidate) |" in report
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["samples"] == 12 and len(analysis["greedy"]) == len(analysis["tensors"])
    assert analysis["greedy"][-1]["percent_params"] == pytest.approx(100.0)


def test_chunks_group_samples_that_share_candidates():
    """Samples 0 and 2 share originals {0, 1}, samples 1 and 3 share {2, 3}: two chunks, each original once."""
    cands = [[0, 1], [2, 3], [1, 0], [3, 2], [4, 0]]
    assert dot_products.plan_chunks(cands, 2) == [([0, 2], [0, 1]), ([1, 3], [2, 3]), ([4], [0, 4])]
    assert sum(len(os) for _, os in dot_products.plan_chunks(cands, 2)) == 6  # consecutive chunks would need 10
    assert dot_products.plan_chunks(cands, 10) == [([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])]
