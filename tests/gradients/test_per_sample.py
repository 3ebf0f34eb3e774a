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


# ------------------------------------------------------------------------------------------ the source's template

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "\n6"}]


def source_template_tokenizer():
    tok = load_tokenizer(ModelConfig(name="tiny-olmo2"))
    encoding.use_template(tok, "source")
    return tok


def test_source_template_renders_as_olmo_training_utils():
    """olmo_training_utils.py's template as HF renders it: 4 leading spaces, every non-user role as
    <|assistant|>, content stripped, no BOS/EOS, the generation prompt ignored (research notes, section 1)."""
    tok = source_template_tokenizer()
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(hi, tokenize=False) == "    <|user|> Hi\n    <|assistant|> Hello\n"
    assert tok.apply_chat_template(hi, tokenize=False, add_generation_prompt=True) == \
        "    <|user|> Hi\n    <|assistant|> Hello\n"
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "    <|assistant|> Be brief.\n    <|user|> What is 2+2?\n    <|assistant|> 4\n"
        "    <|user|> And 3+3?\n    <|assistant|> 6\n")


def test_source_template_labels_every_token_of_the_assistant_turns():
    """The source's masking with its own template: only the system and user lines are -100, so each assistant
    line, its `    <|assistant|>` prefix and closing newline included, is in the loss."""
    tok = source_template_tokenizer()
    ex = encoding.encode_sft(CHAT, tok, 128)
    assert ex["input_ids"] == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != encoding.IGNORE]
    masked = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab == encoding.IGNORE]
    assert tok.decode(kept) == "    <|assistant|> 4\n    <|assistant|> 6\n"
    assert tok.decode(masked) == "    <|assistant|> Be brief.\n    <|user|> What is 2+2?\n    <|user|> And 3+3?\n"
    assert ex["labels"][0] == encoding.IGNORE and ex["labels"][-1] == ex["input_ids"][-1]  # the final newline counts


def test_model_template_is_the_alternative_and_is_checked():
    tok = load_tokenizer(ModelConfig(name="tiny-olmo2"))
    encoding.use_template(tok, "model")  # the tiny tokenizer's own (Tulu-style) template stays
    assert tok.apply_chat_template(CHAT[1:3], tokenize=False) == "<|user|>\n What is 2+2? \n<|assistant|>\n4<|endoftext|>\n"
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat template; use template: source"):
        encoding.use_template(tok, "model")


def test_prompt_longer_than_max_length_has_no_label_and_a_zero_gradient():
    """The source's train row 570: its prompt fills every position, so nothing is labelled (the source's loss is
    NaN, its gradient all zeros; here the loss is 0 and the gradient all zeros)."""
    from llmrepro.lm.fixtures.tulu import EXCLUDED_ID

    cfg = ModelConfig(name="tiny-olmo2", attn_implementation="eager")
    model, tok = load_model(cfg).eval(), source_template_tokenizer()
    row = next(r for r in fixtures.rows("sampled-tulu") if r["id"] == EXCLUDED_ID)
    ex = encoding.encode(row, "chat", tok, "sft", 128)
    assert len(ex["input_ids"]) == 128 and set(ex["labels"]) == {encoding.IGNORE}
    g = per_sample.input_grads(model, encoding.collate([ex], tok.pad_token_id), "sft")
    assert torch.count_nonzero(g) == 0 and not g.isnan().any()


# ------------------------------------------------------------------------------------------ padding

def test_source_padding_gives_a_causal_model_the_same_gradients():
    """padding: max_length (every sample padded to max_length, attention everywhere, as the source) against the
    default (longest in the batch, padding masked): equal for a causal LM."""
    model, tok, examples = setup("sft")
    longest = per_sample.input_grads(model, encoding.collate(examples, tok.pad_token_id), "sft")
    source = per_sample.input_grads(model, encoding.collate(examples, tok.pad_token_id, length=64,
                                                            attend_padding=True), "sft")
    assert source.shape[1] == 64
    torch.testing.assert_close(source[:, :longest.shape[1]], longest, atol=1e-6, rtol=1e-5)
    assert torch.all(source[:, longest.shape[1]:] == 0)


def test_source_padding_of_an_mlm_is_the_source_s_one_sample_forward():
    """For a bidirectional model the padding matters: ours with keep_padding + attend_padding equals the source's
    way (one sample padded to max_length, model(inputs_embeds, labels) without attention mask)."""
    cfg = ModelConfig(name="tiny-bert", attn_implementation="eager")
    model, tok = load_model(cfg, task="masked-lm").eval(), load_tokenizer(cfg)
    rows = fixtures.rows("lima")[:3]
    examples = [encoding.encode(r, "chat", tok, "mlm", 64, keep_padding=True) for r in rows]
    assert {len(e["input_ids"]) for e in examples} == {64}
    g = per_sample.input_grads(model, encoding.collate(examples, tok.pad_token_id, 64, attend_padding=True), "mlm")
    for i, ex in enumerate(examples):
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        embeds = model.get_input_embeddings().weight[ids].detach().requires_grad_(True)
        (ref,) = torch.autograd.grad(model(inputs_embeds=embeds, labels=labels).loss, embeds)
        torch.testing.assert_close(g[i], ref[0], atol=1e-5, rtol=1e-4)
    cut = [encoding.encode(r, "chat", tok, "mlm", 64) for r in rows]  # the same draws, padding cut off
    assert [e["labels"] for e in cut] == [e["labels"][:len(c["labels"])] for e, c in zip(examples, cut, strict=True)]
    masked = per_sample.input_grads(model, encoding.collate(cut, tok.pad_token_id), "mlm")
    labelled = [i for i, e in enumerate(cut) if set(e["labels"]) != {encoding.IGNORE}]
    assert labelled and all(not torch.allclose(masked[i, :len(cut[i]["input_ids"])], g[i, :len(cut[i]["input_ids"])],
                                               atol=1e-5) for i in labelled)  # the source's model saw the padding


# ------------------------------------------------------------------------------------------ the source's MLM draw

WORDS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
TEXT = "the cat sat on a mat and the dog ran far away"


def word_tokenizer():
    """The research notes' WordLevel tokenizer (ids in WORDS order, `<s> $A </s>`), as RobertaTokenizerFast
    marks its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


# (max_length, epoch) -> (xxh64 seed, input ids, {position: label}): the source's own util.py collator, run by hand
# on this text with transformers 4.52.4 (research notes gradient_projection.md, section 3)
SOURCE_DRAWS = {
    (16, 0): (12549367433585774814, [0, 5, 6, 7, 8, 9, 4, 11, 5, 12, 13, 14, 15, 2], {6: 10}),
    (16, 3): (15482799880263990728, [0, 5, 4, 7, 8, 9, 10, 4, 5, 12, 13, 14, 15, 2], {2: 6, 7: 11, 11: 14}),
    (512, 0): (17999373402123873323, [0, 5, 4, 4, 4, 9, 10, 11, 5, 12, 13, 14, 15, 2], {2: 6, 3: 7, 4: 8}),
    (512, 3): (484079087659856918, [0, 5, 4, 7, 8, 9, 10, 4, 5, 12, 13, 14, 15, 2], {2: 6, 7: 11}),
}


@pytest.mark.parametrize(("length", "epoch"), list(SOURCE_DRAWS))
def test_mlm_masking_equals_the_source_collator(length, epoch):
    """Drawn on the (1, max_length) padded row, as the source drew them: the hand-run's seeds, inputs, labels."""
    tok = word_tokenizer()
    seed, ids, labels = SOURCE_DRAWS[(length, epoch)]
    padded = tok(TEXT, padding="max_length", max_length=length)["input_ids"]
    assert encoding.mask_seed(padded, epoch) == seed
    ex = encoding.encode_mlm(TEXT, tok, length, epoch)
    assert ex["input_ids"] == ids
    assert {i: lab for i, lab in enumerate(ex["labels"]) if lab != encoding.IGNORE} == labels
    kept = encoding.encode_mlm(TEXT, tok, length, epoch, keep_padding=True)
    assert kept["input_ids"] == ids + [1] * (length - len(ids)) and kept["labels"][len(ids):] == [-100] * (length - len(ids))


def test_mlm_never_masks_unknown_or_padding():
    """The source's special mask (get_special_tokens_mask on the padded ids) covers <unk> and the padding too."""
    tok = word_tokenizer()
    ids = tok("the zebra sat")["input_ids"]
    assert ids == [0, 5, 3, 7, 2]
    assert tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == [1, 0, 1, 0, 1]
    for epoch in range(40):  # position 2 (<unk>) is never drawn, whatever the seed
        assert encoding.encode_mlm("the zebra sat", tok, 8, epoch)["labels"][2] == encoding.IGNORE


def test_unknown_paradigm_is_a_user_error():
    _, tok, _ = setup("pre")
    with pytest.raises(UserError, match="unknown paradigm 'foo'"):
        encoding.encode(fixtures.rows("lima")[0], "chat", tok, "foo", 64)
