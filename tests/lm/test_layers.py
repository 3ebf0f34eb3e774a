"""One finder for the decoder parts that hooks attach to, checked against each family's own attribute paths,
bare and under a peft wrapper."""

from __future__ import annotations

import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.lm import layers
from llmrepro.lm.models import ModelConfig, load_model

# family -> (layers, final norm, input embeddings) as written in transformers' modelling code
PATHS = {
    "tiny-llama": ("model.layers", "model.norm", "model.embed_tokens"),
    "tiny-olmo2": ("model.layers", "model.norm", "model.embed_tokens"),
    "tiny-opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "model.decoder.embed_tokens"),
    "tiny-gpt2": ("transformer.h", "transformer.ln_f", "transformer.wte"),
    "tiny-pythia": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in"),
}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("peft", [False, True])
def test_decoder_parts_are_the_family_s_own_modules(name, peft):
    model = load_model(ModelConfig(name=name))
    want_layers, want_norm, want_embed = (_get(model, p) for p in PATHS[name])
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    embed, found, norm = layers.decoder_parts(model)
    assert [id(m) for m in found] == [id(m) for m in want_layers] == [id(m) for m in layers.decoder_layers(model)]
    assert norm is want_norm and embed is want_embed


def test_a_model_without_decoder_layers_is_one_line():
    with pytest.raises(UserError, match="Linear: cannot find its decoder layers"):
        layers.decoder_layers(torch.nn.Linear(2, 2))


def test_layer_output_takes_a_tensor_or_a_tuple():
    t = torch.ones(2, 3)
    assert layers.layer_output(t) is t and layers.layer_output((t, None)) is t
