"""Captured per-sample gradients against vmap and one-at-a-time backward passes, and the factored projection
against explicitly projecting the materialized gradient with the Kronecker product of its two matrices."""

from __future__ import annotations

import json

import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.gradients import capture, encoding, per_sample
from llmrepro.gradients.dot_products import split_dims
from llmrepro.gradients.factored import FactoredProjector, factor_dims, side_matrix
from llmrepro.lm import fixtures
from llmrepro.lm.models import LoraSpec, ModelConfig, load_model, load_tokenizer

CASES = {  # name: (model, paradigm, lora)
    "llama-sft": ("tiny-llama", "sft", None),  # embedding, linear, RMSNorm (vjp)
    "olmo2-pre": ("tiny-olmo2", "pre", None),  # q/k norms inside attention
    "gpt2-pre": ("tiny-gpt2", "pre", None),  # Conv1D, biases, LayerNorm, wte tied to lm_head, wpe run once
    "llama-lora": ("tiny-llama", "sft", LoraSpec(r=4, target_modules=["q_proj", "v_proj"])),
}


def setup(case: str, dtype=torch.float32):
    name, paradigm, lora = CASES[case]
    cfg = ModelConfig(name=name, attn_implementation="eager", lora=lora)
    model = load_model(cfg).eval().to(dtype)
    tok = load_tokenizer(cfg)
    rows = fixtures.rows("lima")[:3] + fixtures.rows("lima")[-1:]  # lengths differ (padding); the last is multi-turn
    batch = encoding.collate([encoding.encode(r, "chat", tok, paradigm, 64) for r in rows], tok.pad_token_id)
    params = per_sample.select_params(model, "lora" if lora else "parameters")
    return model, batch, paradigm, params


@pytest.mark.parametrize("case", list(CASES))
def test_captured_gradients_equal_vmap_and_one_backward_per_sample(case):
    model, batch, paradigm, params = setup(case)
    plan = capture.capture_plan(model, params)
    got = capture.materialize_all(capture.capture(model, batch, paradigm, plan))
    assert list(got) == list(params)
    if case == "gpt2-pre":  # tied: the input embedding and the output layer both contribute
        assert [u.kind for u in plan.uses["transformer.wte.weight"]] == ["embedding", "linear"]
    for i in range(len(batch["input_ids"])):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in batch.items()}
        logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
        per_sample.per_sample_loss(logits, one["labels"], paradigm).sum().backward()
        for n, p in params.items():
            ref = p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
            torch.testing.assert_close(got[n][i], ref, atol=1e-5, rtol=1e-4, msg=n)
    if case == "llama-sft":  # and the vmap path, on the whole batch
        ref = per_sample.per_sample_grads(model, batch, paradigm, "parameters")
        for n in params:
            torch.testing.assert_close(got[n], ref[n].flatten(1), atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case, kind", [(c, "rademacher") for c in CASES] + [("llama-sft", "normal")])
def test_factored_projection_is_the_kronecker_projection_of_the_materialized_gradient(case, kind):
    model, batch, paradigm, params = setup(case, torch.float64)
    plan = capture.capture_plan(model, params)
    sizes = {n: p.numel() for n, p in params.items()}
    proj = FactoredProjector(plan, split_dims(sizes, sum(sizes.values()) // 20, 1, "exact"), kind, seed=42)
    grads = capture.capture(model, batch, paradigm, plan)
    out = proj(grads)
    assert proj.factors and list(out) == list(proj.dims)
    nonzero = 0
    for name, (R, C) in proj.factors.items():
        G = grads[name].materialize()  # (B, rows * cols), row-major as the parameter
        ref = G @ torch.kron(R.double(), C.double())  # vec(R^T G C) = (R (x) C)^T vec(G)
        assert out[name].shape == (len(G), R.shape[1] * C.shape[1]) == ref.shape
        torch.testing.assert_close(out[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)
        nonzero += bool(ref.abs().max() > 0)
    assert nonzero >= len(proj.factors) / 2  # (LoRA's A gradients are 0 while B is at its zero init)
    for name, p in proj.dense.items():  # biases, norms: traker's projector on the materialized gradient
        torch.testing.assert_close(out[name], p.project(grads[name].materialize().float()))
    # factored: every linear/embedding weight; the rest densely
    assert set(proj.factors) == {n for n in proj.dims if plan.factorable(n)}


def test_factored_matrices_are_seeded_per_tensor_and_side_and_are_traker_s():
    from trak.projectors import BasicProjector, ProjectionType

    for block_mb in (1024, 1):  # one block, and traker's blocks (seed + 1000 i) stitched together
        m = side_matrix(700, 300, "rademacher", 7, "cpu", block_mb)
        ref = BasicProjector(grad_dim=700, proj_dim=300, seed=7, proj_type=ProjectionType.rademacher,
                             device="cpu", block_size=300 if block_mb == 1024 else 1 * 2**20 // (4 * 700))
        torch.testing.assert_close(m, ref.project(torch.eye(700), model_id=0))
    assert set(m.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(side_matrix(5, 5, "normal", 1, "cpu", 1024), 5 ** 0.5 * torch.eye(5))  # no shrink
    model, _, _, params = setup("llama-sft")
    plan = capture.capture_plan(model, params)
    dims = split_dims({n: p.numel() for n, p in params.items()}, 4096, 1, "exact")
    a, b = FactoredProjector(plan, dims, "normal", 42), FactoredProjector(plan, dims, "normal", 42)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(a.factors[name][0], b.factors[name][0])  # the same matrices in every process
    assert not torch.equal(a.factors[name][0][:, :5], a.factors["model.layers.1.mlp.up_proj.weight"][0][:, :5])
    assert a.describe()["type"] == "factored_normal" and a.describe()["dims_used"] == sum(a.dims.values())


@pytest.mark.parametrize("k, rows, cols, expected", [
    (4096, 176, 64, (64, 64)), (100, 8, 2048, (8, 12)), (3932, 1024, 384, (63, 62)), (10**6, 10, 10, (10, 10)),
    (1, 5, 5, (1, 1))])
def test_factor_dims_split_k_evenly_within_the_matrix(k, rows, cols, expected):
    assert factor_dims(k, rows, cols) == expected


def test_factored_needs_a_parameter_target():
    from llmrepro.recipes import extract_gradients

    with pytest.raises(ValueError, match="set target: parameters or lora"):
        extract_gradients.Config.model_validate({
            "model": {"name": "tiny-llama"}, "data": {"name": "fixture:lima", "format": "chat"},
            "projection": {"dim": 512, "projector": "factored"}})
    with pytest.raises(ValueError, match="factored.FactoredProjector"):
        from llmrepro.gradients.projection import Projection, Projector

        Projector(Projection(dim=8, projector="factored"), 100)


def test_a_module_whose_output_is_not_per_sample_is_a_user_error():
    model, batch, paradigm, params = setup("llama-sft")
    emb = model.get_input_embeddings()
    with pytest.MonkeyPatch.context() as mp:  # an output of 2 rows for a batch of 4
        mp.setattr(emb, "forward", lambda ids: torch.nn.functional.embedding(ids[:2], emb.weight))
        with pytest.raises(UserError, match="gives output .* for a batch of 4"):
            capture.capture(model, batch, paradigm, capture.capture_plan(model, params))


# ------------------------------------------------------------------------------------------------ the recipes

def test_extract_gradients_factored_stores_the_kronecker_projections_of_the_vmap_gradients(cli, tmp_path):
    """projection.projector: factored in extract-gradients (target parameters): the stored rows are, tensor by
    tensor in parameter order, the vmap gradient projected with R (x) C (weights) or traker's matrix (the rest)."""
    import yaml

    from llmrepro.gradients import store
    from llmrepro.gradients.projection import Projection
    from llmrepro.recipes import extract_gradients

    exp = "gradients/olmo2-7b-sft-normal8192-train"
    code, _, err = cli("run", exp, "--profile", "smoke", "--output-dir", str(tmp_path), "data.limit=6",
                       "target=parameters", "projection.projector=factored", "projection.type=rademacher",
                       "projection.dim=2048", "grad_dtype=float32", "--run-id", "f")
    assert code == 0, err
    run = tmp_path / exp / "f"
    stored, params, meta = store.load(run)
    cfg = extract_gradients.Config.model_validate(params)
    assert meta["projection"]["projector"] == "factored" and meta["projection"]["dim"] == 2048
    assert (run / "gradients" / "factored_rademacher_2048").is_dir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dim"] == 2048 and metrics["dims_used"] == stored.shape[-1] == meta["projection"]["dims_used"]

    model = load_model(cfg.model.model_copy(update={"revision": None})).eval()
    tok = load_tokenizer(cfg.model)
    encoding.use_template(tok, cfg.template)
    rows = fixtures.rows("sampled-tulu")[:6]
    proj = extract_gradients.make_projector(model, cfg, extract_gradients.grad_dim(model, cfg), "cpu")
    examples = [encoding.encode(r, "chat", tok, cfg.paradigm, cfg.max_length) for r in rows]
    ref = per_sample.per_sample_grads(model, encoding.collate(examples, tok.pad_token_id), cfg.paradigm, "parameters")
    parts = []
    for name in proj.dims:
        g = ref[name].flatten(1).double()
        if name in proj.factors:
            R, C = proj.factors[name]
            parts.append(g @ torch.kron(R.double(), C.double()))
        else:
            parts.append(proj.dense[name].project(g.float()).double())
    want = torch.cat(parts, 1)
    got = stored.reshape(len(rows), -1).double()
    assert got.shape == want.shape and len(proj.factors) >= 10
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert yaml.safe_load((run / "config.yaml").read_text())["params"]["projection"]["projector"] == "factored"
    assert isinstance(Projection.model_validate(params["projection"]).folder, str)


def test_layer_dot_products_compares_dense_and_factored_projections_with_the_full_gradient(tmp_path):
    """`projections:` gives, from one gradient computation, the full dot products (as a run without projections)
    and each projection's (as gradient-similarity's `projection:` run of it alone); the comparison's numbers
    re-computed from those dot products."""
    import numpy as np
    from scipy import stats

    from llmrepro.core.context import RunContext
    from llmrepro.gradients import pairs, similarity
    from llmrepro.recipes import layer_dot_products

    base = dict(model={"name": "tiny-llama", "attn_implementation": "eager"},
                data={"name": "fixture:tulu-v2", "format": "chat"},
                variants_data={"name": "fixture:lima-paraphrased", "format": "paraphrased", "limit": 6},
                top_k=3, chunk_size=3, batch_size=2, method="hooks")
    specs = {"dense": {"fractions": [0.05], "projector": "basic", "input_dtype": "float32"},
             "factored": {"fractions": [0.05], "projector": "factored"}}
    cfg = layer_dot_products.Config.model_validate({**base, "projections": specs})

    def compute(i, **kw):
        ctx = RunContext(dir=tmp_path / "fam" / "exp" / f"run-{i}")
        return pairs.compute_dot_products(cfg, pairs.load_pairs(cfg, ctx), ctx, **kw)

    both, totals = compute(0, projections=cfg.projections)
    alone, _ = compute(1)
    factored, _ = compute(2, projection=cfg.projections["factored"])
    assert set(totals) == {"dense_5pct", "factored_5pct"}
    full = both.unlabelled()
    assert list(full.tensors) == list(alone.tensors) and set(full.methods.values()) == {"materialized"}
    np.testing.assert_allclose(full.matrices()[1], alone.matrices()[1], rtol=1e-5, atol=1e-9)
    part = both.part("factored_5pct")
    np.testing.assert_allclose(part.matrices()[1], factored.part("5pct").matrices()[1], rtol=1e-5, atol=1e-9)
    assert {m for m in part.methods.values()} == {"factored", "dense"}
    assert set(both.part("dense_5pct").methods.values()) == {"dense"}

    pairs_ = pairs.load_pairs(cfg, RunContext(dir=tmp_path / "fam" / "exp" / "run-3"))
    table = layer_dot_products.compare(full, {k: both.part(k) for k in totals}, totals, pairs_.p_ids, pairs_.o_ids)
    _, fpo, fpp, foo = full.matrices()
    _, ppo, ppp, poo = part.matrices()
    f_all = fpo.sum(1) / np.sqrt(fpp.sum(1) * foo.sum(1))  # (pairs,) cosine of the concatenated gradients
    g_all = ppo.sum(1) / np.sqrt(ppp.sum(1) * poo.sum(1))
    got = table["projections"]["factored_5pct"]
    assert got["spearman_vs_full"] == pytest.approx(stats.spearmanr(g_all, f_all).statistic)
    assert got["vs_full"] == pytest.approx(g_all @ f_all / np.linalg.norm(g_all) / np.linalg.norm(f_all))
    truth = similarity.truth_positions(full, pairs_.p_ids, pairs_.o_ids)
    per = lambda x: x.reshape(len(truth), -1)  # noqa: E731
    assert got["accuracy"] == pytest.approx(np.mean(per(g_all).argmax(1) == truth))
    assert got["top1_agreement"] == pytest.approx(np.mean(per(g_all).argmax(1) == per(f_all).argmax(1)))
    name = "model.layers.0.mlp.up_proj.weight"
    j = list(part.tensors).index(name)
    cos_t = ppo[:, j] / np.sqrt(ppp[:, j] * poo[:, j])
    assert table["tensors"][name]["factored_5pct"]["accuracy"] == pytest.approx(np.mean(per(cos_t).argmax(1) == truth))
    assert table["tensors"][name]["factored_5pct"]["method"] == "factored"
    csv = layer_dot_products.per_tensor_csv(table).splitlines()
    assert csv[0].split(",")[:5] == ["tensor", "component", "params", "accuracy_full", "dims_dense_5pct"]
    assert len(csv) == 1 + len(full.tensors)
