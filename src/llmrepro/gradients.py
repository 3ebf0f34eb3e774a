"""Per-sample loss gradients of a language model, computed a batch at a time.

Public API (used by `extract-gradients` and by the gradient-similarity recipes):

    examples = [encode(row, fmt, tokenizer, paradigm, max_length) for row in rows]   # input_ids + labels
    batch = collate(examples, tokenizer.pad_token_id)        # {input_ids, attention_mask, labels}: (B, T)
    g = input_grads(model, batch, paradigm)                  # (B, T, d): d loss_i / d inputs_embeds_i
    g = per_sample_grads(model, batch, paradigm, target="parameters"|"lora")  # {name: (B, *param.shape)}
    losses = per_sample_loss(logits, labels, paradigm)       # (B,): each sample's mean token loss

`per_sample_grads` streams: call it once per batch and reduce (project, dot, norm) before the next one, so
only one batch of gradients is ever alive. `flatten(grads)` turns its dict into (B, D) in parameter order.

Paradigms and their loss, as in the source (the 'Gradient dimensionality reduction' project):
- `pre`: causal LM on the whole text (padding excluded), labels = input ids, shifted inside the loss.
- `sft`: causal LM on chat rows rendered with the tokenizer's (Tulu) chat template; labels are -100 outside
  assistant turns, found the source's way (token counts of the rendered message prefixes).
- `mlm`: masked LM with the source's deterministic masking: per sample, a torch generator seeded with
  xxh64(padded token ids, epoch) draws 15% of the non-special tokens as targets, 80% of which become
  [MASK], 10% a random token and 10% stay.

Each sample's loss is the mean over its labelled tokens, which is what `model(...).loss` gives for a batch of
one, so the gradients equal the source's one-at-a-time ones. Why batching is exact: samples never interact
(the attention mask keeps padding out, the model runs in eval mode), so d(sum_i loss_i)/d embeds_i is
d loss_i / d embeds_i. Parameter gradients need `torch.func.vmap(grad(...))` instead; the attention mask
is then passed as a 4-D additive bias built from tensors only, since the models' own mask helpers branch on
the mask's values, which vmap cannot trace.

Deliberate differences from the source: the model is in eval mode (the source used train mode, so
dropout made BERT/RoBERTa gradients random); the attention mask is passed (the source padded to
`max_length` without one, so padding leaked into bidirectional models); a sample without any labelled
token gets a zero gradient instead of NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmrepro.errors import UserError

Paradigm = Literal["pre", "mlm", "sft"]
Target = Literal["inputs_embeds", "parameters", "lora"]
PARADIGMS = ("pre", "mlm", "sft")
IGNORE = -100
MLM_PROBABILITY = 0.15


# ---------------------------------------------------------------------------------------------- encoding

def text_of(row: dict, fmt: str, tokenizer) -> str:
    """The training text of a row for the `pre` and `mlm` paradigms (chat rows through the chat template)."""
    from llmrepro import data

    if fmt == "chat":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if fmt == "true-false":
        return row["statement"]
    rec = data.to_instruction(row, fmt)  # alpaca-style data: the source's Alpaca prompt
    if rec["input"]:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{rec['instruction']}\n\n### Input:\n{rec['input']}\n\n### Response:\n{rec['response']}")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{rec['instruction']}\n\n### Response:\n{rec['response']}")


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_sft(messages: list[dict], tokenizer, max_length: int) -> dict:
    """Chat ids with labels -100 on every non-assistant message (and the assistant prefix that follows it)."""
    ids = _chat_ids(tokenizer, messages)
    labels = list(ids)
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i])) if i else 0
        before_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = len(_chat_ids(tokenizer, messages[: i + 1], generation_prompt=before_assistant))
        labels[start:end] = [IGNORE] * (end - start)
        if end >= max_length:
            break
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_pre(text: str, tokenizer, max_length: int) -> dict:
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": list(ids)}


def mask_seed(ids: list[int], pad_id: int, max_length: int, epoch: int = 0) -> int:
    """The source's per-sample masking seed: xxh64 of the ids padded to max_length (int64) and bytes(epoch)."""
    import numpy as np
    import xxhash

    padded = np.full(max_length, pad_id, dtype=np.int64)
    padded[: len(ids)] = ids
    h = xxhash.xxh64()
    h.update(padded)
    h.update(bytes(epoch))
    return h.intdigest()


def encode_mlm(text: str, tokenizer, max_length: int, epoch: int = 0) -> dict:
    """Deterministic 80/10/10 masking of 15% of the non-special tokens, drawn as the source drew them."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    ids = torch.tensor(enc["input_ids"])[None]  # (1, T)
    special = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)[None]
    gen = torch.Generator().manual_seed(mask_seed(enc["input_ids"], tokenizer.pad_token_id, max_length, epoch))
    labels = ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, MLM_PROBABILITY).masked_fill(special, 0.0), generator=gen).bool()
    labels[~masked] = IGNORE
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & masked
    ids[replaced] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & masked & ~replaced
    ids[randomised] = torch.randint(len(tokenizer), ids.shape, dtype=torch.long, generator=gen)[randomised]
    return {"input_ids": ids[0].tolist(), "labels": labels[0].tolist()}


def encode(row: dict, fmt: str, tokenizer, paradigm: Paradigm, max_length: int, epoch: int = 0) -> dict:
    """One row -> {input_ids, labels} (lists) for `paradigm`."""
    if paradigm == "sft":
        if fmt != "chat":
            raise UserError(f"paradigm sft needs chat data (format chat), not format {fmt}")
        return encode_sft(row["messages"], tokenizer, max_length)
    if paradigm == "mlm":
        return encode_mlm(text_of(row, fmt, tokenizer), tokenizer, max_length, epoch)
    if paradigm == "pre":
        return encode_pre(text_of(row, fmt, tokenizer), tokenizer, max_length)
    raise UserError(f"unknown paradigm '{paradigm}' (known: {', '.join(PARADIGMS)})")


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
