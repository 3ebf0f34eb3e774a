"""Ghost dot products against the dot products of the materialized gradients, the per-layer rule, and the
streamed run with ghost tensors against the vmap run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrepro.core.context import RunContext
from llmrepro.core.errors import UserError
from llmrepro.gradients import capture, encoding, ghost, pairs, per_sample
from llmrepro.gradients.pairs import PairsConfig, ProjectionConfig
from llmrepro.lm import fixtures
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer


@pytest.mark.parametrize("name, paradigm", [("tiny-llama", "sft"), ("tiny-gpt2", "pre")])
def test_ghost_dot_products_equal_the_materialized_ones(name, paradigm):
    cfg = ModelConfig(name=name, attn_implementation="eager")
    model, tok = load_model(cfg).eval().double(), load_tokenizer(cfg)
    rows = fixtures.rows("lima")
    enc = lambda rs: encoding.collate([encoding.encode(r, "chat", tok, paradigm, 64) for r in rs],  # noqa: E731
                                      tok.pad_token_id)
    params = per_sample.select_params(model, "parameters")
    plan = capture.capture_plan(model, params)
    P = capture.capture(model, enc(rows[:3]), paradigm, plan)  # 3 samples, padded to their longest
    Q = capture.capture(model, enc(rows[3:5] + rows[-1:]), paradigm, plan)  # other lengths
    linear = [n for n in params if plan.one_linear(n)]
    assert len(linear) >= 8
    every = {n: n in linear for n in params}
    dots, sq = ghost.cross(ghost.features(P, every), ghost.features(Q, every)), ghost.norms(ghost.features(P, every))
    for n in linear:
        gp, gq = P[n].materialize(), Q[n].materialize()
        ref = gp @ gq.T
        assert ref.abs().max() > 0
        torch.testing.assert_close(dots[n], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=n)
        torch.testing.assert_close(sq[n], (gp * gp).sum(1), rtol=1e-5, atol=0, msg=n)
    needed = torch.tensor([[True, False, True], [False, False, False], [False, True, True]])
    some = ghost.cross(ghost.features(P, every), ghost.features(Q, every), needed)  # only the pairs that are read
    for n in linear[:3]:
        ref = P[n].materialize() @ Q[n].materialize().T
        torch.testing.assert_close(some[n][needed], ref[needed], rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert not some[n][~needed].any()
    # materialized tensors go through as matrix products
    none = {n: False for n in params}
    plain = ghost.cross(ghost.features(P, none), ghost.features(Q, none))
    n = next(iter(params))
    torch.testing.assert_close(plain[n], P[n].materialize() @ Q[n].materialize().T)


def test_the_rule_picks_linear_layers_where_two_t_squared_fit_in_the_weight():
    model = load_model(ModelConfig(name="tiny-llama")).eval()  # q/o 64x64, k/v 32x64, mlp 176x64
    params = per_sample.select_params(model, "parameters")
    plan = capture.capture_plan(model, params)
    chosen = {n for n, g in ghost.choose(plan, 40).items() if g}  # 2 * 40^2 = 3200
    assert chosen == {n for n in params if n.endswith(("q_proj.weight", "o_proj.weight", "mlp.gate_proj.weight",
                                                        "mlp.up_proj.weight", "mlp.down_proj.weight", "lm_head.weight"))}
    assert {n for n, g in ghost.choose(plan, 80).items() if g} == {  # 12800 <= 176 * 64 = 11264? no; lm_head 65536
        n for n in params if n.endswith("lm_head.weight")}
    assert not any(ghost.choose(plan, 200).values())  # 80000 > 1024 * 64
    assert "model.embed_tokens.weight" not in chosen and not any("norm" in n for n in chosen)  # stay materialized


CFG = dict(model={"name": "tiny-llama", "attn_implementation": "eager"},
           data={"name": "fixture:tulu-v2", "format": "chat"},
           variants_data={"name": "fixture:lima-paraphrased", "format": "paraphrased", "limit": 6},
           top_k=3, chunk_size=3, batch_size=2)


def dot_products(tmp_path, projection=None, **overrides):
    cfg = PairsConfig.model_validate({**CFG, **overrides})
    ctx = RunContext(dir=tmp_path / "fam" / "exp" / f"run-{len(list(tmp_path.glob('fam/exp/*')))}")
    return pairs.compute_dot_products(cfg, pairs.load_pairs(cfg, ctx), ctx, projection)[0]


def test_streamed_ghost_and_hooks_runs_equal_the_vmap_run(tmp_path, monkeypatch):
    ref = dot_products(tmp_path)
    assert set(ref.methods.values()) == {"vmap"}
    hooks = dot_products(tmp_path, method="hooks")
    assert set(hooks.methods.values()) == {"materialized"} and hooks.max_tokens is None
    natural = dot_products(tmp_path, method="ghost")  # the rule on these samples (T = the longest)
    assert natural.max_tokens > 40 and natural.methods["model.embed_tokens.weight"] == "materialized"
    assert {n for n, m in natural.methods.items() if m == "ghost"} == {
        n for n, g in ghost.choose(capture.capture_plan(*_model_params(tmp_path)), natural.max_tokens).items() if g}
    monkeypatch.setattr(ghost, "choose", lambda plan, t: {n: plan.one_linear(n) for n in plan.params})
    forced = dot_products(tmp_path, method="ghost")  # every linear layer ghost
    assert sum(m == "ghost" for m in forced.methods.values()) == 15
    _, po, pp, oo = ref.matrices()
    for run in (hooks, natural, forced):
        keys, rpo, rpp, roo = run.matrices()
        assert keys == ref.matrices()[0]
        for got, want in ((rpo, po), (rpp, pp), (roo, oo)):  # float32 model: relative to each tensor's scale
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _model_params(tmp_path):
    model = load_model(ModelConfig(**CFG["model"])).eval()
    return model, per_sample.select_params(model, "parameters")


def test_ghost_with_a_projection_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="method ghost gives dot products of full gradients"):
        dot_products(tmp_path, ProjectionConfig(projector="basic"), method="ghost")
    from llmrepro.recipes import gradient_similarity

    with pytest.raises(ValueError, match="method ghost gives dot products of full gradients"):
        gradient_similarity.Config.model_validate({**CFG, "method": "ghost", "projection": {"projector": "basic"}})
