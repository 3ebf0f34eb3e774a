"""Where the representations live in a decoder: its layers, each layer's attention output projection (whose input
is the per-head attention output, concatenated) and the head geometry, found by name for any supported family.

The thesis patched OPT (`model.model.layers = model.model.decoder.layers`, `o_proj = out_proj`, Detection cell 11);
finding the modules by name makes the patch unnecessary. A decoder layer returns a tensor in transformers 5 and a
tuple (hidden, ...) before: `layer_output` takes either.
"""

from __future__ import annotations

from llmrepro.core.errors import UserError

LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.model.layers",
               "base_model.model.model.layers", "base_model.model.model.decoder.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model) -> list:
    for path in LAYER_PATHS:
        layers = _get(model, path)
        if layers is not None and len(layers):
            return list(layers)
    raise UserError(f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(LAYER_PATHS)})")


def out_projections(model) -> list:
    """Each layer's attention output projection (Llama/Mistral/Phi-3 `o_proj`, OPT `out_proj`, GPT-2 `c_proj`)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = next((getattr(layer, n) for n in ATTENTION_NAMES if hasattr(layer, n)), None)
        proj = None if attn is None else next((getattr(attn, n) for n in OUT_PROJ_NAMES if hasattr(attn, n)), None)
        if proj is None:
            raise UserError(f"{type(model).__name__}: layer {i} has no attention output projection "
                            f"({'/'.join(ATTENTION_NAMES)}.{'/'.join(OUT_PROJ_NAMES)})")
        out.append(proj)
    return out


def head_shape(model) -> tuple[int, int]:
    """(heads, head_dim) of the attention output: from the config (attention modules in transformers >= 4.48 no
    longer carry num_heads); head_dim from the config where it has one (it need not be hidden/heads)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(heads), int(head_dim)


def layer_output(output):
    """The hidden states a decoder layer returned: the tensor itself (transformers 5) or the first tuple entry."""
    return output[0] if isinstance(output, (tuple, list)) else output
