"""Per-sample gradients: batched input gradients and vmapped parameter gradients against a one-at-a-time loop."""

from __future__ import annotations

import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.gradients import encoding, per_sample
from llmrepro.lm import fixtures
from llmrepro.lm.models import LoraSpec, ModelConfig, load_model, load_tokenizer

MODELS = {"pre": "tiny-olmo2", "sft": "tiny-llama", "mlm": "tiny-bert"}


def setup(paradigm: str, **model_kwargs):
    cfg = ModelConfig(name=MODELS[paradigm], attn_implementation="eager", **model_kwargs)
    model = load_model(cfg, task="masked-lm" if paradigm == "mlm" else "causal-lm").eval()
    tok = load_tokenizer(cfg)
    rows = fixtures.rows("lima")[:3] + fixtures.rows("lima")[-1:]  # lengths differ (padding); the last is multi-turn
    examples = [encoding.encode(r, "chat", tok, paradigm, 64) for r in rows]
    return model, tok, examples


def one_at_a_time(model, tok, example):
    """The source's way: a batch of one, inputs_embeds = E[input_ids], model(...).loss, backward."""
    batch = encoding.collate([example], tok.pad_token_id)
    model.zero_grad()
    embeds = model.get_input_embeddings().weight[batch["input_ids"]].detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
    (g,) = torch.autograd.grad(loss, embeds)
    return g[0]


@pytest.mark.parametrize("paradigm", ["pre", "sft", "mlm"])
def test_input_grads_equal_one_at_a_time(paradigm):
    model, tok, examples = setup(paradigm)
    batch = encoding.collate(examples, tok.pad_token_id)
    g = per_sample.input_grads(model, batch, paradigm)  # (B, T, d)
    assert g.shape[:2] == batch["input_ids"].shape
    labelled = [any(t != encoding.IGNORE for t in ex["labels"]) for ex in examples]
    assert sum(labelled) >= 3  # (MLM masks 15% of the tokens: a short sample may get none)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ref = one_at_a_time(model, tok, ex)
        if labelled[i]:
            assert ref.abs().max() > 1e-4  # a real gradient, not zeros
        torch.testing.assert_close(g[i, :n], ref if labelled[i] else torch.zeros_like(ref), atol=1e-5, rtol=1e-4)
        assert torch.all(g[i, n:] == 0)  # padding gets no gradient


@pytest.mark.parametrize("paradigm", ["pre", "mlm"])
def test_parameter_grads_equal_one_at_a_time(paradigm):
    model, tok, examples = setup(paradigm)
    grads = per_sample.per_sample_grads(model, encoding.collate(examples, tok.pad_token_id), paradigm, "parameters")
    assert list(grads) == [n for n, _ in model.named_parameters()]
    for i, ex in enumerate(examples):
        model.zero_grad()
        model(**encoding.collate([ex], tok.pad_token_id)).loss.backward()
        for name, p in model.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[name][i], ref, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_grads_are_the_adapters_only_and_chunking_changes_nothing():
    model, tok, examples = setup("sft", lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    batch = encoding.collate(examples, tok.pad_token_id)
    grads = per_sample.per_sample_grads(model, batch, "sft", "lora")
    assert grads and all("lora_" in n for n in grads)
    chunked = per_sample.per_sample_grads(model, batch, "sft", "lora", chunk_size=1)
    for name in grads:
        torch.testing.assert_close(grads[name], chunked[name])
    model.zero_grad()
    model(**encoding.collate(examples[1:2], tok.pad_token_id)).loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name][1], p.grad, atol=1e-5, rtol=1e-4)
    assert per_sample.flatten(grads).shape == (4, sum(p.numel() for n, p in model.named_parameters() if n in grads))


def test_sft_labels_cover_assistant_turns_only():
    _, tok, examples = setup("sft")
    first = examples[0]
    kept = tok.decode([t for t, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != encoding.IGNORE])
    assert kept == "Paris is in France.<|endoftext|>\n"
    multi = tok.decode([t for t, lab in zip(examples[-1]["input_ids"], examples[-1]["labels"], strict=True) if lab != encoding.IGNORE])
    assert multi == "In Germany.<|endoftext|>\nYes.<|endoftext|>\n"


def test_mlm_masking_matches_the_source_draws():
    """Same draws as the source's DeterministicDataCollatorForLanguageModeling (global torch.manual_seed)."""
    _, tok, _ = setup("mlm")
    text = "Paris is the capital and largest city of France. Many people visit Paris every year."
    ex = encoding.encode_mlm(text, tok, 64, epoch=2)
    enc = tok(text, truncation=True, max_length=64, return_special_tokens_mask=True)
    ids = torch.tensor(enc["input_ids"])[None]
    torch.manual_seed(encoding.mask_seed(enc["input_ids"], tok.pad_token_id, 64, 2))
    prob = torch.full(ids.shape, 0.15).masked_fill(torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)[None], 0)
    masked = torch.bernoulli(prob).bool()
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & masked
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & masked & ~replaced
    words = torch.randint(len(tok), ids.shape, dtype=torch.long)
    expected = ids.clone()
    expected[replaced] = tok.mask_token_id
    expected[randomised] = words[randomised]
    assert ex["input_ids"] == expected[0].tolist()
    assert ex["labels"] == torch.where(masked, ids, -100)[0].tolist()
    assert masked.any()
    assert encoding.encode_mlm(text, tok, 64, epoch=3) != ex  # the epoch is part of the seed


def test_unknown_paradigm_is_a_user_error():
    _, tok, _ = setup("pre")
    with pytest.raises(UserError, match="unknown paradigm 'foo'"):
        encoding.encode(fixtures.rows("lima")[0], "chat", tok, "foo", 64)
