"""Gradient similarity: streamed dot products against the source's one-at-a-time computation, partitions,
projection as the source split and seeded it, the source's scores, and the reader of the source's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrepro.core.context import RunContext
from llmrepro.core.errors import UserError
from llmrepro.gradients import dot_products, pairs, similarity
from llmrepro.gradients.dot_products import DotProducts
from llmrepro.gradients.pairs import PairsConfig, ProjectionConfig

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
CFG = dict(model={"name": "tiny-llama", "attn_implementation": "eager", "tiny_config": SMALL},
           data={"name": "fixture:tulu-v2", "format": "chat"},
           variants_data={"name": "fixture:lima-paraphrased", "format": "paraphrased", "limit": 7},
           top_k=3, chunk_size=3, batch_size=2)
SOURCE = Path(__file__).parent / "data" / "gs_source"


def run_dots(tmp_path_factory, projection=None, **overrides):
    cfg = PairsConfig.model_validate({**CFG, **overrides})
    ctx = RunContext(dir=tmp_path_factory.mktemp("fam") / "exp" / "run")
    loaded = pairs.load_pairs(cfg, ctx)
    return pairs.compute_dot_products(cfg, loaded, ctx, projection)[0], loaded


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run_dots(tmp_path_factory)


def source_gradients(rows: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The source's way (src/model_operations.py get_gradients + open-instruct's tokenize): the tulu template
    forced onto the tokenizer, labels -100 on the first len(prompt ids) tokens, no truncation, the model's own
    (default) attention, one sample at a time, model(...).loss.backward()."""
    from llmrepro.lm import templates
    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

    mcfg = ModelConfig(name="tiny-llama", tiny_config=SMALL)
    tok, model = load_tokenizer(mcfg), load_model(mcfg).eval()
    tok.chat_template = templates.OPEN_INSTRUCT_TULU_TEMPLATE
    out = []
    for row in rows:
        ids = list(tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        labels = [-100] * len(prompt) + ids[len(prompt):]
        model.zero_grad()
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
              attention_mask=torch.ones(1, len(ids), dtype=torch.long)).loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def test_dot_products_equal_the_source_computation_one_sample_at_a_time(whole):
    dots, loaded = whole
    gp, go = source_gradients(loaded.variants), source_gradients(loaded.originals)
    names = list(dots.tensors)
    assert names == list(gp[0]) and len(dots.pairs) == 7 * 3
    for (p, o), (d_po, d_oo) in dots.pairs.items():
        ref_po = np.array([float(gp[p][n].double().flatten() @ go[o][n].double().flatten()) for n in names])
        ref_oo = np.array([float(go[o][n].double().pow(2).sum()) for n in names])
        np.testing.assert_allclose(d_po, ref_po, rtol=1e-5, atol=1e-5 * np.abs(ref_po).max())
        np.testing.assert_allclose(d_oo, ref_oo, rtol=1e-5)
    for p, d_pp in dots.paraphrased.items():
        np.testing.assert_allclose(d_pp, [float(gp[p][n].double().pow(2).sum()) for n in names], rtol=1e-5)
    # the full cosine = CosineSimilarity of the flattened gradients (the source's __calculate_flattened_similarities)
    keys, po, pp, oo = dots.matrices()
    full, _ = similarity.cosines(po, pp, oo)
    flat = lambda g: torch.cat([g[n].flatten() for n in names])  # noqa: E731
    for i in (0, 4, 11):
        p, o = keys[i]
        assert full[i] == pytest.approx(float(torch.nn.CosineSimilarity(dim=0)(flat(gp[p]), flat(go[o]))), abs=1e-5)


def test_partitioned_run_merges_into_the_whole_run_exactly(whole, tmp_path_factory):
    dots, loaded = whole
    ids = loaded.p_ids, loaded.o_ids
    parts = [similarity.dots_json(run_dots(tmp_path_factory, partition_start=a, partition_end=b)[0], *ids)
             for a, b in [(0, 2), (2, 7)]]
    assert similarity.merge(parts) == similarity.dots_json(dots, *ids)  # bit for bit, edges mid-chunk
    with pytest.raises(UserError, match="partitions overlap"):
        similarity.merge([parts[1], parts[1]])


def test_projection_totals_and_per_tensor_dims_as_the_source_split_them():
    """AMD-OLMo-1B-SFT: 1 embedding of 103,022,592, 64 attention tensors of 4,194,304, 48 MLP tensors of 16,777,216
    (results/parameters_per_layer); src/computation.py gives totals 11,767,808 / 58,838,016 and per tensor
    1,030,144 / 41,984 / 167,936 at 1% and 5,151,232 / 209,920 / 838,656 at 5%."""
    sizes = {"embed": 103_022_592} | {f"attn{i}": 4_194_304 for i in range(64)} | {f"mlp{i}": 16_777_216 for i in range(48)}
    assert sum(sizes.values()) == 1_176_764_416
    for fraction, total, (e, a, m), used in ((0.01, 11_767_808, (1_030_144, 41_984, 167_936), 11_778_048),
                                             (0.05, 58_838_016, (5_151_232, 209_920, 838_656), 58_841_600)):
        assert dot_products.projection_total(sum(sizes.values()), fraction) == total
        dims = dot_products.split_dims(sizes, total, rule="source")
        assert (dims["embed"], dims["attn0"], dims["mlp0"]) == (e, a, m) and sum(dims.values()) == used
    exact = {"a": 1000, "b": 300, "c": 7}
    assert sum(dot_products.split_dims(exact, 130).values()) == 130
    assert dot_products.split_dims(exact, 1024, multiple=512) == {"a": 1024}
    assert dot_products.split_dims(exact, 512, rule="source") == {"a": 512, "b": 512, "c": 512}  # at least 512 each
    with pytest.raises(UserError, match="rounds to 0 dimensions"):
        dot_products.projection_total(10_000, 0.01)


def test_projection_seeds_are_the_same_in_every_process_and_in_the_source_range():
    name = "model.layers.0.mlp.up_proj.weight"
    code = f"from llmrepro.gradients.dot_products import tensor_seed; print(tensor_seed({name!r}, 42))"
    seeds = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": s}, capture_output=True,
                            text=True).stdout.strip() for s in ("1", "2")}
    assert seeds == {str(dot_products.tensor_seed(name, 42))}
    assert 42 <= dot_products.tensor_seed(name, 42) < 42 + 10_000


def test_float16_input_is_the_gradient_rounded_before_projection():
    from llmrepro.gradients.projection import Projection, Projector

    g = {"w": torch.randn(3, 40) * torch.logspace(-9, 0, 40)}  # small entries underflow in float16
    spec = Projection(dim=16, seed=7)
    half = dot_products.TensorProjector({"w": 40}, spec, input_dtype="float16")(g)["w"]
    full = dot_products.TensorProjector({"w": 40}, spec, input_dtype="float32")(g)["w"]
    ref = Projector(spec.model_copy(update={"seed": dot_products.tensor_seed("w", 7)}), 40)
    torch.testing.assert_close(half, ref.project(g["w"].half().float()))
    torch.testing.assert_close(full, ref.project(g["w"]))
    assert not torch.equal(half, full)


def test_projected_cosines_are_cosines_of_the_concatenated_per_tensor_projections(whole, tmp_path_factory):
    proj = ProjectionConfig(fractions=[0.02, 0.05], projector="basic", dims="exact")
    dots, loaded = run_dots(tmp_path_factory, projection=proj)
    assert {n.split("/")[0] for n in dots.tensors} == {"2pct", "5pct"}
    full_dots, _ = whole
    gp = source_gradients(loaded.variants[:1])[0]
    go = source_gradients([loaded.originals[loaded.candidates[0][1]]])[0]
    sizes = dict(full_dots.tensors)
    projector, totals = proj.projector_set(sizes, 42, "cpu")
    assert totals == {"2pct": 512, "5pct": 2048}
    for label in ("2pct", "5pct"):
        part = dots.part(label)
        tp = projector.projectors[label]
        assert part.tensors == tp.dims and sum(tp.dims.values()) == totals[label]
        keys, po, pp, oo = part.matrices()
        cos, _ = similarity.cosines(po, pp, oo)
        vec = lambda g: torch.cat(list(tp({n: g[n].reshape(1, -1) for n in sizes}).values()), dim=1)[0]  # noqa: E731,B023
        ref = torch.nn.functional.cosine_similarity(vec(gp), vec(go), dim=0)
        assert cos[1] == pytest.approx(float(ref), abs=1e-4)  # pair (variant 0, its second candidate)


def test_scores_count_every_variant_and_take_the_first_maximum():
    """calculate_score (analysis.ipynb cell 3): right when the first maximum is the own original; a variant whose
    original is not a candidate counts as wrong; BM25 is right when its first candidate is."""
    scores = np.array([0.5, 0.5, 0.1,   0.2, 0.9, 0.1,   0.3, 0.2, 0.1])
    truth = np.array([0, 1, -1])
    assert similarity.top1_accuracy(scores, truth) == pytest.approx(2 / 3)
    assert similarity.top1_accuracy(np.array([0.5, 0.5, 0.1, 0.2, 0.9, 0.1, 0.3, 0.2, 0.1]), np.array([1, 1, 0])) == \
        pytest.approx(2 / 3)  # tie 0.5/0.5: the first candidate wins
    assert similarity.max_cosine_stats(scores, 3) == (pytest.approx((0.5 + 0.9 + 0.3) / 3), 0.5)


def test_source_dot_product_partitions_are_read_and_merged_as_the_notebook_did():
    d = SOURCE / "data/dot_products/paraphrased/tiny/model/sample_size/full"
    sizes = json.loads((SOURCE / "results/parameters_per_layer/tiny/model/values.json").read_text())
    dots, p_ids, o_ids = similarity.read_source_dot_products([d], sizes)
    assert p_ids == ["lima_0", "lima_1", "lima_2"] and o_ids == ["lima_0", "lima_1", "lima_2", "lima_5"]
    assert [[o_ids[o] for o in dots.candidates[i]] for i in range(3)] == \
        [["lima_0", "lima_5", "lima_1"], ["lima_5", "lima_1", "lima_0"], ["lima_1", "lima_5", "lima_2"]]
    assert list(dots.original[o_ids.index("lima_5")]) == [1.0, 1.0, 1.0]  # the first partition's, not the 4.0 of the second
    s = similarity.summary(dots, p_ids, o_ids)
    assert (s["accuracy"], s["bm25_accuracy"], s["pairs"]) == (1.0, pytest.approx(1 / 3), 9)
    with pytest.raises(UserError, match="no paraphrased_dot_products.json"):
        similarity.read_source_dot_products([d / "dot_products_part_0_2.json"], sizes)
    with pytest.raises(UserError, match="no entry for"):
        similarity.read_source_dot_products([d], {**sizes, "model.norm.weight": 4})


def test_projected_similarity_json_merges_per_dimension():
    a = {"512": {"p1": {"o1": 0.1}}, "2048": {"p1": {"o1": 0.2}}}
    b = {"512": {"p2": {"o1": 0.3}}, "2048": {"p2": {"o1": 0.4}}}
    assert similarity.merge([a, b]) == {"2048": {"p1": {"o1": 0.2}, "p2": {"o1": 0.4}},
                                        "512": {"p1": {"o1": 0.1}, "p2": {"o1": 0.3}}}
    with pytest.raises(UserError, match="different dimensions"):
        similarity.merge([a, {"512": {}}])


def test_chunks_group_samples_that_share_candidates():
    """Samples 0 and 2 share originals {0, 1}, samples 1 and 3 share {2, 3}: two chunks, each original once."""
    cands = [[0, 1], [2, 3], [1, 0], [3, 2], [4, 0]]
    assert dot_products.plan_chunks(cands, 2) == [([0, 2], [0, 1]), ([1, 3], [2, 3]), ([4], [0, 4])]
    assert sum(len(os) for _, os in dot_products.plan_chunks(cands, 2)) == 6  # consecutive chunks would need 10
    assert dot_products.plan_chunks(cands, 10) == [([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])]


def test_dot_products_part_takes_one_projection_out():
    dots = DotProducts({"a/x": 2, "a/y": 3, "b/x": 4}, {0: [0]})
    dots.paraphrased[0] = np.array([1.0, 2.0, 3.0])
    dots.original[0] = np.array([4.0, 5.0, 6.0])
    dots.pairs[(0, 0)] = (np.array([7.0, 8.0, 9.0]), dots.original[0])
    a = dots.part("a")
    assert a.tensors == {"x": 2, "y": 3} and list(a.pairs[(0, 0)][0]) == [7.0, 8.0] and list(a.paraphrased[0]) == [1.0, 2.0]
    with pytest.raises(KeyError):
        dots.part("c")
