"""Training examples for per-sample gradients: a dataset row -> input ids and labels, per paradigm, as the
'Gradient dimensionality reduction' project built them (extract_gradients.py, olmo_training_utils.py and
util.py @ d73147d).

- `pre`: causal LM on the whole text, labels = input ids, shifted inside the loss.
- `sft`: causal LM on chat rows; labels are -100 on every non-assistant message, found the source's way
  (token counts of the rendered message prefixes, asking for the generation prompt before an assistant turn).
  With the source's template (`use_template(tok, "source")`, `templates.GDR_OLMO_TEMPLATE`) that generation
  prompt does not exist, so each assistant turn's `    <|assistant|>` prefix and closing newline are labelled.
- `mlm`: masked LM with the source's deterministic masking: per sample, a generator seeded with
  xxh64(the ids padded to max_length, as int64 bytes; then bytes(epoch)) draws, on the padded (1, max_length)
  row, 15% of the non-special tokens as targets, then 80% of those become the mask token, half the rest a
  random token, the others stay.

`collate` right-pads a batch to its longest example with an attention mask (`padding: longest`), or to
max_length with attention everywhere (`padding: max_length`: the source padded every sample to max_length and
gave the model no mask). Importing this module needs no torch (configs use its `Literal` types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from llmrepro.core.errors import UserError
from llmrepro.lm import data, templates

if TYPE_CHECKING:
    import torch

Paradigm = Literal["pre", "mlm", "sft"]
Target = Literal["inputs_embeds", "parameters", "lora"]
Template = Literal["source", "model"]
Padding = Literal["longest", "max_length"]
PARADIGMS = ("pre", "mlm", "sft")
IGNORE = -100
MLM_PROBABILITY = 0.15  # util.py hard-codes the 0.8 and 0.5 that follow
TEMPLATES: dict[str, str | None] = {"source": templates.GDR_OLMO_TEMPLATE, "model": None}  # None: the tokenizer's own


def use_template(tokenizer, template: Template) -> None:
    """Set the chat template `template` names on `tokenizer` (the source overwrote it on every call)."""
    if TEMPLATES[template] is not None:
        tokenizer.chat_template = TEMPLATES[template]
    elif not getattr(tokenizer, "chat_template", None):
        raise UserError(f"template: model, but the tokenizer of {tokenizer.name_or_path} has no chat template; "
                        "use template: source")


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
    """Chat ids with labels -100 on every non-assistant message (and the generation prompt that follows it)."""
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


def mask_seed(padded_ids, epoch: int = 0) -> int:
    """The source's per-sample masking seed: xxh64 (seed 0) of the padded row's int64 bytes, then of
    `bytes(epoch)`, which is `epoch` zero bytes (nothing for epoch 0)."""
    import numpy as np
    import xxhash

    h = xxhash.xxh64()
    h.update(np.ascontiguousarray(np.asarray(padded_ids, dtype="<i8")))
    h.update(bytes(epoch))
    return h.intdigest()


def encode_mlm(text: str, tokenizer, max_length: int, epoch: int = 0, keep_padding: bool = False) -> dict:
    """The source's deterministic masking, drawn on the row padded to max_length; the padding is cut off
    again unless `keep_padding` (it is never masked: pad is a special token)."""
    import torch

    enc = tokenizer(text, truncation=True, max_length=max_length, padding="max_length")
    ids = torch.tensor(enc["input_ids"])[None]  # (1, max_length)
    # all_special_ids of the padded row, `<unk>` included: what the source's collator computed
    special = torch.tensor(tokenizer.get_special_tokens_mask(enc["input_ids"], already_has_special_tokens=True),
                           dtype=torch.bool)[None]
    gen = torch.Generator().manual_seed(mask_seed(enc["input_ids"], epoch))  # = the source's global manual_seed
    labels = ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, MLM_PROBABILITY).masked_fill(special, 0.0), generator=gen).bool()
    labels[~masked] = IGNORE
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & masked
    ids[replaced] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & masked & ~replaced
    ids[randomised] = torch.randint(len(tokenizer), ids.shape, dtype=torch.long, generator=gen)[randomised]
    keep = slice(None) if keep_padding else torch.tensor(enc["attention_mask"], dtype=torch.bool)
    return {"input_ids": ids[0, keep].tolist(), "labels": labels[0, keep].tolist()}


def encode(row: dict, fmt: str, tokenizer, paradigm: Paradigm, max_length: int, epoch: int = 0,
           keep_padding: bool = False) -> dict:
    """One row -> {input_ids, labels} (lists) for `paradigm`. `keep_padding`: mlm keeps the row's padding."""
    if paradigm == "sft":
        if fmt != "chat":
            raise UserError(f"paradigm sft needs chat data (format chat), not format {fmt}")
        return encode_sft(row["messages"], tokenizer, max_length)
    if paradigm == "mlm":
        return encode_mlm(text_of(row, fmt, tokenizer), tokenizer, max_length, epoch, keep_padding)
    if paradigm == "pre":
        return encode_pre(text_of(row, fmt, tokenizer), tokenizer, max_length)
    raise UserError(f"unknown paradigm '{paradigm}' (known: {', '.join(PARADIGMS)})")


def collate(examples: list[dict], pad_id: int, length: int | None = None,
            attend_padding: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to `length` (default: the longest example): input_ids, attention_mask, labels, each (B, T).

    `attend_padding`: an attention mask of ones, i.e. the model attends to the padding, as the source ran it
    (no mask). Causal models never look right, so only bidirectional ones see a difference."""
    import torch

    length = length or max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.ones_like(ids) if attend_padding else torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
