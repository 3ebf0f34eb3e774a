"""Where a causal LM keeps the parts that hooks attach to: its input embeddings, decoder layers and final norm,
under a peft wrapper too, and what a decoder layer returns (a tensor in transformers 5, a tuple (hidden, ...)
before). One finder for every family the recipes hook (Llama, Mistral, Mixtral, Phi-3, OLMo-2, OPT, GPT-2,
GPT-NeoX): transformers' own `get_decoder()` gives the module that holds the layers (OPT's `model.decoder`, which
the thesis patched by hand: `model.model.layers = model.model.decoder.layers`).
"""

from __future__ import annotations

from llmrepro.core.errors import UserError

LAYER_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def decoder(model):
    """The module holding the decoder layers (under a PeftModel wrapper if any)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)


def decoder_layers(model) -> list:
    inner = decoder(model)
    layers = next((getattr(inner, n) for n in LAYER_NAMES if getattr(inner, n, None) is not None), None)
    if layers is None or not len(layers):
        raise UserError(f"{type(model).__name__}: cannot find its decoder layers (looked for "
                        f"{'/'.join(LAYER_NAMES)} under {type(inner).__name__})")
    return list(layers)


def decoder_parts(model):
    """(input embeddings, decoder layers, final norm)."""
    inner, layers = decoder(model), decoder_layers(model)
    norm = next((getattr(inner, n) for n in NORM_NAMES if getattr(inner, n, None) is not None), None)
    if norm is None:
        raise UserError(f"{type(inner).__name__}: cannot find its final norm ({'/'.join(NORM_NAMES)})")
    return inner.get_input_embeddings(), layers, norm


def layer_output(output):
    """The hidden states a decoder layer returned: the tensor itself (transformers 5) or the first tuple entry."""
    return output[0] if isinstance(output, (tuple, list)) else output
