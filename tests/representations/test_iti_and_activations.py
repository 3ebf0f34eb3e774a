"""The ITI hook shifts exactly the chosen heads' slices by alpha*sigma*direction; the activation cache equals the
thesis' one-statement-at-a-time loop, for Llama-type (o_proj) and OPT (out_proj) models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrepro.lm import layers as lm_layers
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
from llmrepro.representations import activations, hooks
from llmrepro.representations.iti import Intervention, intervene


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt"])
def tiny(request):
    cfg = ModelConfig(name=request.param)
    return load_model(cfg).eval(), load_tokenizer(cfg)


def o_proj_inputs(model, ids):
    """Each layer's o_proj input (B, T, H*d), recorded by pre-hooks registered after any intervention's."""
    seen = {}
    handles = [p.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
               for i, p in enumerate(hooks.out_projections(model))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_iti_hook_changes_exactly_the_chosen_heads_slices(tiny):
    model, tok = tiny
    n_heads, d = hooks.head_shape(model)
    ids = torch.tensor([tok("The city of Paris is in France.")["input_ids"]])
    base = o_proj_inputs(model, ids)
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    iv = Intervention([(1, 0), (1, 3)], dirs, np.array([0.5, 2.0]), alpha=3.0)  # two heads of the last layer
    with intervene(model, iv):
        shifted = o_proj_inputs(model, ids)
    assert torch.equal(shifted[0], base[0])  # layer 0 untouched
    expected = base[1].double().clone()
    expected[..., 0:d] += torch.tensor(3.0 * 0.5 * dirs[0])  # hand-computed shift, every position
    expected[..., 3 * d: 4 * d] += torch.tensor(3.0 * 2.0 * dirs[1])
    assert torch.equal(shifted[1], expected.to(base[1].dtype))
    untouched = torch.ones(n_heads * d, dtype=torch.bool)
    untouched[0:d] = untouched[3 * d: 4 * d] = False
    assert torch.equal(shifted[1][..., untouched], base[1][..., untouched])
    assert all(not p._forward_pre_hooks for p in hooks.out_projections(model))  # removed afterwards
    with intervene(model, iv.top(0)):
        assert torch.equal(o_proj_inputs(model, ids)[1], base[1])  # K = 0: the base model


def test_intervention_shift_vectors_and_file_round_trip(tmp_path):
    iv = Intervention([(0, 1), (2, 0), (0, 0)], np.eye(3)[:3] * 1.0, np.array([1.0, 2.0, 3.0]), 2.0)
    shifts = iv.shifts(2, 3)
    assert set(shifts) == {0, 2}
    # head (0, 1): 2*1*e0 in slice [3, 6); head (0, 0): 2*3*e2 in [0, 3); head (2, 0): 2*2*e1 in [0, 3)
    assert shifts[0].tolist() == [0, 0, 6.0, 2.0, 0, 0] and shifts[2].tolist() == [0, 4.0, 0, 0, 0, 0]
    iv.save(tmp_path / "iv.npz")
    back = Intervention.load(tmp_path / "iv.npz")
    assert back.heads == iv.heads and back.alpha == 2.0 and np.array_equal(back.directions, iv.directions)


def test_cached_activations_equal_the_one_at_a_time_loop(tiny, tmp_path):
    model, tok = tiny
    statements = ["The city of Paris is in France.", "Oslo is a city.", "The city of Lima is not in Peru at all."]
    activations.cache(model, tok, statements, [1, 1, 0], [0, 1, 2], tmp_path, batch_size=2)
    heads = np.load(tmp_path / "heads.npy")
    resid = np.load(tmp_path / "resid.npy")
    n_heads, d = hooks.head_shape(model)
    layers = lm_layers.decoder_layers(model)
    assert heads.shape == (3, len(layers), n_heads, d) and heads.dtype == np.float16
    for i, s in enumerate(statements):  # the thesis' loop: tokenizer.encode, batch 1, input[0][..., -1, :]
        ids = torch.tensor([tok.encode(s)])
        got = o_proj_inputs(model, ids)
        out = {}
        hs = [layer.register_forward_hook(lambda m, a, o, j=j, out=out: out.__setitem__(j, lm_layers.layer_output(o)))
              for j, layer in enumerate(layers)]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        for j in range(len(layers)):
            want = got[j][0, -1].reshape(n_heads, d).numpy().astype(np.float16)
            assert np.allclose(heads[i, j], want, atol=2e-3)
            assert np.allclose(resid[i, j], out[j][0, -1].numpy().astype(np.float16), atol=2e-3)
    assert np.load(tmp_path / "labels.npy").tolist() == [1, 1, 0]
