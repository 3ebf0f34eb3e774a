"""Per-sample loss gradients of a language model, computed a batch at a time.

    examples = [encoding.encode(row, fmt, tokenizer, paradigm, max_length) for row in rows]  # ids + labels
    batch = encoding.collate(examples, tokenizer.pad_token_id)  # {input_ids, attention_mask, labels}: (B, T)
    g = input_grads(model, batch, paradigm)                  # (B, T, d): d loss_i / d inputs_embeds_i
    g = per_sample_grads(model, batch, paradigm, target="parameters"|"lora")  # {name: (B, *param.shape)}
    losses = per_sample_loss(logits, labels, paradigm)       # (B,): each sample's mean token loss

`per_sample_grads` streams: call it once per batch and reduce (project, dot, norm) before the next one, so
only one batch of gradients is ever alive. `flatten(grads)` turns its dict into (B, D) in parameter order.

Each sample's loss is the mean over its labelled tokens, which is what `model(...).loss` gives for a batch of
one, so the gradients equal the source's one-at-a-time ones. Why batching is exact: samples never interact
(attention stays within a row, the model runs in eval mode), so d(sum_i loss_i)/d embeds_i is
d loss_i / d embeds_i. Parameter gradients need `torch.func.vmap(grad(...))` instead; the attention mask
is then passed as a 4-D additive bias built from tensors only, since the models' own mask helpers branch on
the mask's values, which vmap cannot trace.

Deliberate differences from the source (extract_gradients.py @ d73147d):
- the model is in eval mode (the source called `model.train()`: no difference for OLMo-2, which has no
  dropout; for BERT/RoBERTa the source's gradients were dropout-random);
- batches, where the source took one sample per backward pass (exact, see above);
- with `collate`'s default the batch is padded to its longest sample and the padding masked out; the
  source padded every sample to max_length and passed no mask (`collate(..., length=max_length,
  attend_padding=True)` does that). Equal for causal LMs (their positions never see the padding on their
  right, and padding is unlabelled); a bidirectional model sees the padding in the source's way;
- a sample without any labelled token (a prompt longer than max_length) has loss 0 here and NaN in the
  source; its gradient is all zeros in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrepro.core.errors import UserError
from llmrepro.gradients.encoding import IGNORE, Paradigm, Target

# ---------------------------------------------------------------------------------------------- losses

def is_causal(paradigm: Paradigm) -> bool:
    return paradigm != "mlm"


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, paradigm: Paradigm) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) mean token loss per sample; causal paradigms shift by one."""
    if is_causal(paradigm):
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T)
    counts = (labels != IGNORE).sum(dim=1)
    return tokens.sum(dim=1) / counts.clamp(min=1)


def attention_bias(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, T, T) additive bias (0 = attend), with tensor ops only so vmap can trace it."""
    allowed = mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
    if causal:
        t = mask.shape[-1]
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------- gradients

def _device(model) -> torch.device:
    return next(model.parameters()).device


def input_grads(model, batch: dict, paradigm: Paradigm) -> torch.Tensor:
    """d loss_i / d inputs_embeds_i for every sample i: (B, T, d), zero on padding. One backward pass."""
    dev = _device(model)
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    losses = per_sample_loss(logits, batch["labels"].to(dev), paradigm)
    (g,) = torch.autograd.grad(losses.sum(), embeds)
    return g


def select_params(model, target: Target) -> dict[str, torch.nn.Parameter]:
    """The parameters whose gradients `target` asks for: every trainable one, or the LoRA adapters only."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if target == "lora":
        trainable = {n: p for n, p in trainable.items() if "lora_" in n}
        if not trainable:
            raise UserError("target lora: the model has no LoRA parameters; set model.lora")
    elif target != "parameters":
        raise UserError(f"per-sample parameter gradients need target parameters or lora, not '{target}'")
    return trainable


def per_sample_grads(model, batch: dict, paradigm: Paradigm = "pre", target: Target = "parameters",
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """{name: (B, *param.shape)} gradients of each sample's loss via vmap(grad(...)).

    `chunk_size` bounds how many samples vmap differentiates at once (memory), without changing the result.
    """
    from torch.func import functional_call, grad, vmap

    dev = _device(model)
    params = {n: p.detach() for n, p in select_params(model, target).items()}
    dtype = next(iter(params.values())).dtype
    causal = is_causal(paradigm)

    def loss(p, ids, mask, labels):  # one sample: (T,) each
        bias = attention_bias(mask[None], causal, dtype)
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None], "attention_mask": bias}).logits
        return per_sample_loss(logits, labels[None], paradigm)[0]

    args = (batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["labels"].to(dev))
    return vmap(grad(loss), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, *args)


def flatten(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """{name: (B, ...)} -> (B, D), parameters concatenated in the dict's order."""
    return torch.cat([g.flatten(start_dim=1) for g in grads.values()], dim=1)
