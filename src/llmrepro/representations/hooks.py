"""Where the representations live in a decoder: each layer's attention output projection (whose input is the
per-head attention output, concatenated) and the head geometry, found by name for any supported family; the
layers themselves come from `llmrepro.lm.layers`.

The thesis patched OPT (`model.model.layers = model.model.decoder.layers`, `o_proj = out_proj`, Detection cell 11);
finding the modules by name makes the patch unnecessary.
"""

from __future__ import annotations

from llmrepro.core.errors import UserError
from llmrepro.lm.layers import decoder_layers

ATTENTION_NAMES = ("self_attn", "attn", "attention")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense")


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
