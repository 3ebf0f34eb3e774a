"""Gradient similarity inputs as the source built them: the LIMA filter, the published variant datasets read
by column and joined on id, open-instruct's tulu template with the prompt masked and no truncation, and
rank_bm25's BM25Okapi candidates (checked against a hand computation of its formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmrepro.core.context import RunContext
from llmrepro.core.errors import UserError
from llmrepro.gradients import candidates, encoding, pairs
from llmrepro.gradients.pairs import PairsConfig
from llmrepro.lm import fixtures, templates
from llmrepro.lm.models import ModelConfig, load_tokenizer

BASE = dict(model={"name": "tiny-llama"}, data={"name": "fixture:tulu-v2", "format": "chat"})


def test_lima_filter_keeps_lima_rows_with_exactly_two_messages():
    rows = fixtures.rows("tulu-v2")
    kept = pairs.lima_rows(rows)
    assert {r["dataset"] for r in rows} == {"lima", "flan_v2", "oasst1"}
    assert [r["id"] for r in kept] == [f"lima_{i}" for i in range(48)]  # mixture order, multi-turn rows dropped
    odd = {"dataset": "lima", "id": "x", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert pairs.lima_rows([odd]) == [odd]  # the source counts the messages, it does not check their roles
    assert len(pairs.lima_rows(rows, None)) == 48 + 12  # dataset_filter: null keeps every two-message row
    with pytest.raises(UserError, match="no 'dataset' column"):
        pairs.lima_rows([{"id": "a", "messages": []}])


def test_published_variants_are_read_by_column_and_joined_on_id(tmp_path):
    cfg = PairsConfig.model_validate({**BASE, "variants_data": {"name": "fixture:lima-model-generated",
                                                               "format": "model-generated", "limit": 5}})
    loaded = pairs.load_pairs(cfg, RunContext(dir=tmp_path / "fam" / "exp" / "run"))
    published = fixtures.rows("lima-model-generated")[:5]
    assert loaded.p_ids == [r["id"] for r in published]
    assert [v["messages"] for v in loaded.variants] == [r["model_generated_messages"] for r in published]
    for v, cands in zip(loaded.variants, loaded.candidates, strict=True):
        assert v["id"] in [loaded.o_ids[o] for o in cands]  # the own original is always a candidate
    # the same questions as the paraphrased set, so the same BM25 candidates (the source's 0.8360 in both settings)
    para = pairs.load_pairs(PairsConfig.model_validate({**BASE, "variants_data": {
        "name": "fixture:lima-paraphrased", "format": "paraphrased", "limit": 5}}), RunContext(dir=tmp_path / "a" / "b" / "c"))
    assert para.candidates == loaded.candidates


def test_variant_rows_errors_name_the_row():
    good = {"id": "lima_0", "paraphrased_messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert pairs.variant_rows([good], "paraphrased", "x") == [{"id": "lima_0", "messages": good["paraphrased_messages"]}]
    # a hub copy that still carries the originals in `messages`: the variant is read from its own column
    both = {**good, "messages": [{"role": "user", "content": "original q"}, {"role": "assistant", "content": "original a"}]}
    assert pairs.variant_rows([both], "paraphrased", "x")[0]["messages"][0]["content"] == "q"
    with pytest.raises(UserError, match=r"x: id lima_0 appears twice"):
        pairs.variant_rows([good, good], "paraphrased", "x")
    with pytest.raises(UserError, match=r"row 0 \(lima_0\): 'paraphrased_messages' must be two messages"):
        pairs.variant_rows([{**good, "paraphrased_messages": good["paraphrased_messages"][:1]}], "paraphrased", "x")


def test_open_instruct_tulu_template_with_the_prompt_masked_by_its_token_count():
    """open-instruct's tulu (dataset_processor.py @ 5fd117a): '<|user|>\\n{u}\\n<|assistant|>\\n{a}' + EOS, no newline
    after the last EOS; SFTDatasetProcessor.tokenize masks the first len(prompt ids) labels."""
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    pairs.force_template(tok, "tulu")
    assert tok.chat_template == templates.OPEN_INSTRUCT_TULU_TEMPLATE
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>"
    three = msgs + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Yes"}]
    assert tok.apply_chat_template(three, tokenize=False) == \
        "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>\n<|user|>\nMore\n<|assistant|>\nYes<|endoftext|>"
    ex = encoding.encode({"messages": msgs}, "chat", tok, "sft", 10**9)
    prompt = tok("<|user|>\nHi\n<|assistant|>\n")["input_ids"]
    assert ex["input_ids"] == tok("<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>")["input_ids"]
    assert ex["labels"] == [-100] * len(prompt) + ex["input_ids"][len(prompt):]
    assert ex["labels"][-1] == tok.eos_token_id  # the EOS is a target


def test_no_truncation_by_default():
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    pairs.force_template(tok, "tulu")
    long = {"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 3000}]}
    cfg = PairsConfig.model_validate(BASE)
    assert cfg.max_length is None
    full = tok.apply_chat_template(long["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert len(full) > 3000
    assert encoding.encode(long, "chat", tok, "sft", cfg.max_length or 10**9)["input_ids"] == list(full)


def okapi_scores(query: list[str], docs: list[list[str]], k1=1.5, b=0.75, eps=0.25) -> np.ndarray:
    """BM25Okapi written out (rank_bm25 0.2.2's formula): IDF log((N-n+0.5)/(n+0.5)), a negative IDF replaced by
    eps times the mean of all IDFs, every query token counted."""
    n_docs, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    vocab = {w for d in docs for w in d}
    idf = {w: math.log(n_docs - sum(w in d for d in docs) + 0.5) - math.log(sum(w in d for d in docs) + 0.5) for w in vocab}
    floor = eps * sum(idf.values()) / len(idf)
    idf = {w: floor if v < 0 else v for w, v in idf.items()}
    return np.array([sum(idf.get(q, 0) * d.count(q) * (k1 + 1) / (d.count(q) + k1 * (1 - b + b * len(d) / avgdl))
                         for q in query) for d in docs])


def test_bm25_is_rank_bm25_okapi_with_its_idf_floor():
    corpus = ["the cat sat on the mat", "the dog sat", "the cat ran far", "a bird", "the end"]
    query = "the cat sat"
    expected = np.argsort(-okapi_scores(query.split(), [d.split() for d in corpus]), kind="stable")[:3].tolist()
    assert candidates.bm25_candidates([query], corpus, [None], k=3, ties="stable") == [expected]
    # 'the' is in 4 of 5 documents: its IDF log(1.5/4.5) < 0 becomes 0.25 x the mean IDF > 0 (bm25s' robertson
    # would clip it to 0); "a bird" and "the end" match one rare word each and have the same length, so only the
    # floored 'the' puts "the end" first (with IDF 0 they would tie and the stable order would put "a bird" first)
    top = candidates.bm25_candidates(["the bird end"], corpus, [None], k=5, ties="stable")[0]
    assert top.index(4) < top.index(3)
    scores = okapi_scores(["the"], [d.split() for d in corpus])
    assert (scores[[0, 1, 2, 4]] > 0).all() and scores[3] == 0


def test_bm25_is_case_sensitive_on_whitespace_tokens_and_forces_the_truth_into_the_last_slot():
    corpus = ["red apple pie", "green apple tart", "blue sky", "apple juice", "plain water", "Apple pie!"]
    assert candidates.bm25_candidates(["apple pie"], corpus, [0], k=3)[0][0] == 0
    assert 5 not in candidates.bm25_candidates(["apple pie"], corpus, [None], k=2, ties="stable")[0]  # 'Apple', 'pie!'
    top = candidates.bm25_candidates(["apple"], corpus, [4], k=3)[0]
    assert top[-1] == 4 and set(top[:2]) <= {0, 1, 3}
    with pytest.raises(UserError, match="top_k=9 is larger than the 6 originals"):
        candidates.bm25_candidates(["apple"], corpus, [0], k=9)
