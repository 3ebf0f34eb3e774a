"""Training examples for per-sample gradients: a dataset row -> input ids and labels, per paradigm, as the
'Gradient dimensionality reduction' project built them.

- `pre`: causal LM on the whole text (padding excluded), labels = input ids, shifted inside the loss.
- `sft`: causal LM on chat rows rendered with the tokenizer's (Tulu) chat template; labels are -100 outside
  assistant turns, found the source's way (token counts of the rendered message prefixes).
- `mlm`: masked LM with the source's deterministic masking: per sample, a torch generator seeded with
  xxh64(padded token ids, epoch) draws 15% of the non-special tokens as targets, 80% of which become
  [MASK], 10% a random token and 10% stay.

Importing this module needs no torch (configs use its `Paradigm` and `Target` types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from llmrepro.core.errors import UserError
from llmrepro.lm import data, templates

if TYPE_CHECKING:
    import torch

Paradigm = Literal["pre", "mlm", "sft"]
Target = Literal["inputs_embeds", "parameters", "lora"]
PARADIGMS = ("pre", "mlm", "sft")
IGNORE = -100
MLM_PROBABILITY = 0.15


def text_of(row: dict, fmt: str, tokenizer) -> str:
    """The training text of a row for the `pre` and `mlm` paradigms (chat rows through the chat template)."""
    if fmt == "chat":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if fmt == "true-false":
        return row["statement"]
    rec = data.to_instruction(row, fmt)  # alpaca-style data: the source's Alpaca prompt
    return templates.alpaca_prompt(rec["instruction"], rec["input"], rec["response"])


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
    import torch

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
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
