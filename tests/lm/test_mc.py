"""Multiple-choice scoring: the formulas against hand computations, the model plumbing against direct forward
passes, and the real TruthfulQA files read unchanged (skipped without ../shared)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.lm import mc
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "truthfulqa"


def test_mc1_mc2_mc3_match_a_hand_computation_on_three_choices():
    # choices: best true (log p -1.0), another true (-2.5), one false (-1.5)
    scores, labels = [-1.0, -2.5, -1.5], [1, 1, 0]
    p = [math.exp(s) for s in scores]
    m = mc.mc_metrics(scores, labels, best=0)
    assert m["mc1"] == 1.0  # -1.0 > -1.5
    assert m["mc2"] == pytest.approx((p[0] + p[1]) / sum(p), rel=1e-12)
    assert m["mc3"] == 0.5  # one of the two true answers beats the false one
    # the best answer below the false one: MC1 = 0, MC2 unchanged
    m = mc.mc_metrics(scores, labels, best=1)
    assert m["mc1"] == 0.0 and m["mc2"] == pytest.approx((p[0] + p[1]) / sum(p))


def test_numbered_score_is_ratio_over_one_plus_ratio():
    lp = [math.log(0.3), math.log(0.1), math.log(0.05)]
    ratio = 0.3 / (0.1 + 0.05)
    out = mc.numbered_score(lp, 0)
    assert out["score"] == pytest.approx(ratio / (1 + ratio)) == pytest.approx(0.3 / 0.45)
    assert out["accuracy"] == 1.0 and out["coverage"] == pytest.approx(0.45)
    assert mc.numbered_score(lp, 2)["accuracy"] == 0.0


def test_jeffreys_and_bootstrap_reproduce_the_thesis_unit_tests():
    lo, hi = mc.jeffreys_ci(67, 100)  # ITI notebooks cell 56: [.57, .76]
    assert lo == pytest.approx(0.57, abs=0.01) and hi == pytest.approx(0.76, abs=0.01)
    v = np.zeros(100)
    v[:67] = 1
    lo, hi = mc.bootstrap_ci(v, seed=1)  # cell 58: the same interval within 0.015
    assert lo == pytest.approx(0.57, abs=0.015) and hi == pytest.approx(0.76, abs=0.015)


def test_dirichlet_baseline_is_the_closed_form_of_the_thesis_sampling():
    items = [mc.MCItem("q", ["a", "b", "c"], [1, 0, 0]), mc.MCItem("r", ["a", "b", "c", "d"], [1, 1, 0, 0])]
    rng = np.random.default_rng(0)
    sampled = [rng.dirichlet(np.full(len(it.labels), 0.3), 20000)[:, : sum(it.labels)].sum(1).mean() for it in items]
    assert mc.dirichlet_baseline(items) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert np.mean(sampled) == pytest.approx(mc.dirichlet_baseline(items), abs=0.01)


def test_split_multi_answer_and_format_best_follow_truthfulqa():
    assert mc.split_multi_answer("Yes, it is; No.;  ; Maybe") == ["Yes, it is.", "No.", "Maybe."]
    assert mc.format_best(" Nothing happens ") == "Nothing happens."


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name="tiny-llama")
    return load_model(cfg).eval(), load_tokenizer(cfg)


def _direct(model, ids, start):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_batched_sequence_logprobs_equal_one_at_a_time(tiny):
    model, tok = tiny
    seqs = [(tok("Q: Which country is Paris in?\nA: France")["input_ids"], 9),
            (tok("Q: x\nA: Spain")["input_ids"], 4), (tok("Hi there")["input_ids"], 1)]
    batched = mc.sequence_logprobs(model, seqs, batch_size=3)
    assert batched == pytest.approx([_direct(model, ids, s) for ids, s in seqs], abs=1e-4)


def test_thesis_mode_tokenizes_context_and_choice_apart_with_a_manual_bos(tiny):
    model, tok = tiny
    item = mc.MCItem("Which country is Paris in?", ["France", "Spain"], [1, 0], few_shot="Q: a\nA: b\n\n")
    (ids, start), _ = mc.thesis_sequences(tok, item, mc.ThesisOptions())
    context = tok("Q: a\nA: b\n\nQ: Which country is Paris in?\nA: ", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + context + tok("France", add_special_tokens=False)["input_ids"]
    assert start == 1 + len(context)
    out = mc.score_thesis(model, tok, [item], mc.ScoringOptions())[0]
    s = [_direct(model, i, st) for i, st in mc.thesis_sequences(tok, item, mc.ThesisOptions())]
    assert out["p_true"] == pytest.approx(math.exp(s[0]) / (math.exp(s[0]) + math.exp(s[1])), abs=1e-4)


def test_honest_llama_mode_scores_the_answer_after_the_prompt_and_the_three_prefix_tokens(tiny):
    model, tok = tiny
    item = mc.MCItem("Which country is Paris in?", ["Paris is in France.", "Paris is in Spain."], [1, 0])
    head = mc.INSTRUCTIONS["default"] + "\n\n" + mc.QA_PRIMER + "\n\nQ: " + item.question
    seqs = mc.honest_llama_sequences(tok, item.question, item.choices, mc.HonestLlamaOptions())
    assert seqs[0][0] == tok(head + "\nA: " + item.choices[0])["input_ids"]
    assert seqs[0][1] == len(tok(head)["input_ids"]) + 3
    out = mc.score_honest_llama(model, tok, [item], mc.ScoringOptions())[0]
    s = [_direct(model, i, st) for i, st in seqs]
    assert out["mc1"] == float(s[0] > s[1])
    assert out["mc2"] == pytest.approx(math.exp(s[0]) / (math.exp(s[0]) + math.exp(s[1])), abs=1e-4)


def test_numbered_mode_reads_the_choice_number_tokens_at_the_answer_position(tiny):
    model, tok = tiny
    item = mc.MCItem("Which country is Paris in?", ["France", "Spain", "Peru", "Chile"], [1, 0, 0, 0],
                     ["France", "Spain", "Peru"], [1, 0, 0])
    ids, label, n = mc.numbered_prompt(tok, item, mc.NumberedOptions())
    assert (label, n) == (0, 3)
    assert "3 Peru\n" in tok.decode(ids) and "Chile" not in tok.decode(ids)  # the MC1 set, numbered
    number_ids = mc.choice_token_ids(tok, 3)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    p = [math.exp(float(logp[i])) for i in number_ids]
    out = mc.score_numbered(model, tok, [item, item], mc.ScoringOptions())[0]
    assert out["score"] == pytest.approx(p[0] / sum(p), abs=1e-4)


def test_load_items_reads_both_target_shapes_and_pairs(tmp_path):
    hf = mc.load_items(mc.MCData(name="fixture:truthfulqa-mc"))
    assert hf[0].mc1_choices[0] == hf[0].best_answer() and sum(hf[0].mc1_labels) == 1
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([{"question": "q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "c": 1, "b": 0}}]))
    (it,) = mc.load_items(mc.MCData(name=str(path)))
    assert (it.choices, it.labels, it.mc1_choices) == (["a", "c", "b"], [1, 1, 0], ["a", "b"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    (p,) = mc.load_items(mc.MCData(name=str(pairs), format="preference"))
    assert (p.question, p.choices, p.labels, p.mc1_labels) == ("Hi?", ["Hello.", "Go away."], [1, 0], [1, 0])
    path.write_text(json.dumps([{"question": "q?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}]))
    with pytest.raises(UserError, match="exactly one true"):
        mc.load_items(mc.MCData(name=str(path)))


def test_truthfulqa_csv_fixture_has_the_real_files_byte_order_mark():
    from llmrepro.lm import fixtures

    assert fixtures.path("truthfulqa-csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    items = mc.load_items(mc.MCData(name=str(fixtures.path("truthfulqa-csv")), format="truthfulqa-csv"))
    assert items[0].best == "Paris is in France." and items[0].choices[:2] == ["Paris is in France.", "It is in France."]


@pytest.mark.skipif(not (SHARED / "mc_task.json").is_file(), reason="needs ../shared/data/truthfulqa")
def test_the_real_truthfulqa_files_load_unchanged():
    items = mc.load_items(mc.MCData(name=str(SHARED / "mc_task.json")))
    assert len(items) == 817 and sum(len(it.choices) for it in items) == 6204
    assert sum(len(it.mc1_choices) for it in items) == 4186
    assert items[0].question == "What happens if you eat a pomegranate?"
    assert mc.dirichlet_baseline(items) == pytest.approx(0.4641, abs=1e-4)
    rows = mc.read_truthfulqa_csv(SHARED / "TruthfulQA.csv")
    assert len(rows) == 817 and list(rows[0])[:3] == ["Type", "Category", "Question"]  # no "\ufeffType"
    csv_items = mc.truthfulqa_csv_items(rows)
    assert all(it.best in it.choices and it.labels[it.choices.index(it.best)] == 1 for it in csv_items)
