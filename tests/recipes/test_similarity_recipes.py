"""The gradient-similarity experiments: their YAML headers, one-line errors, the projected output in the source's
layout, and make-variants' generation as the source did it (prompt, answer cut, budget, system prompt)."""

from __future__ import annotations

import json
import re

import pytest

from llmrepro.core import catalog
from llmrepro.recipes import make_variants

FAMILY = [n for n in catalog.names() if n.startswith("similarity/")]


@pytest.mark.parametrize("name", FAMILY)
def test_yaml_header_names_the_command_the_source_file_and_commit(name):
    exp = catalog.load(name)
    lines = exp.path.read_text().splitlines()
    assert lines[0] == f"# llmrepro run {name}"
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "lukas-hinterleitner/master-thesis" in header and re.search(r"@ [0-9a-f]{7}", header)
    assert re.search(r"\b[\w/]+\.(py|ipynb)\b", header), "names the source file"
    assert "Deliberate differences" in header and "What the source did" in header
    assert exp.spec.reference, "carries the source's published figures"
    module = catalog.registry.get(exp.spec.recipe).load()
    assert "Deliberate differences from the source" in module.__doc__


def test_every_reference_names_a_metric_the_smoke_run_reports(tmp_path, cli):
    """The reference blocks point at real metric names (checked on the cheap full-gradient run)."""
    code, _, err = cli("run", "similarity/gradient-similarity-paraphrased", "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 0, err
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    exp = catalog.load("similarity/gradient-similarity-paraphrased")
    assert {r.metric for r in exp.spec.reference} <= set(metrics) and metrics["reference"]["accuracy"]["where"]
    assert metrics["samples"] == 12 and metrics["pairs"] == 60 and 0 <= metrics["accuracy"] <= 1


def test_projected_similarities_in_the_source_layout(tmp_path, cli):
    code, _, err = cli("run", "similarity/gradient-similarity-model-generated-projected", "--profile", "smoke",
                       "--output-dir", str(tmp_path))
    assert code == 0, err
    run = next((tmp_path / "similarity" / "gradient-similarity-model-generated-projected").iterdir())
    sims, metrics = json.loads((run / "similarities.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert list(sims) == sorted(str(metrics[f"dims_{x}"]) for x in ("1pct", "5pct"))  # nominal dims, sorted as text
    for dim in sims:
        assert len(sims[dim]) == 12 and all(len(c) == 5 for c in sims[dim].values())
    assert metrics["dims_used_1pct"] >= metrics["dims_1pct"]  # every tensor gets at least 512 (the source's split)
    for label in ("1pct", "5pct"):
        best = [max(c, key=c.get) == p for p, c in sims[str(metrics[f"dims_{label}"])].items()]
        assert metrics[f"accuracy_{label}"] == pytest.approx(sum(best) / len(best))


@pytest.mark.parametrize("args, message", [
    (["similarity/gradient-similarity-paraphrased", "partition_start=5", "partition_end=2"],
     "partition_end (2) must be greater than partition_start (5)"),
    (["similarity/gradient-similarity-paraphrased", "partition_start=500"], "partition_start=500 is past the last of 12"),
    (["similarity/gradient-similarity-paraphrased", "variants_data=null", "variants.run_dir=/nonexistent"],
     "needs /nonexistent: no finished run at /nonexistent"),
    (["similarity/gradient-similarity-paraphrased", "variants.run_dir=/x"], "give variants_data"),
    (["similarity/gradient-similarity-paraphrased", "top_k=50"], "top_k=50 is larger than the 48 originals"),
    (["similarity/gradient-similarity-paraphrased", "dataset_filter=alpaca"], "no rows with dataset == 'alpaca'"),
    (["similarity/gradient-similarity-paraphrased", "expect_eos_token_id=50279"], "the tokenizer's EOS is id 0"),
    (["similarity/gradient-similarity-paraphrased", "variants_data.name=fixture:lima-model-generated"],
     "missing column 'paraphrased_messages'"),
    (["similarity/gradient-similarity-paraphrased", "variants_data.name=fixture:alpaca", "variants_data.format=alpaca"],
     "variants_data.format must be one of"),
    (["similarity/gradient-similarity-paraphrased-projected", "projection.projector=cuda"],
     "projection.projector=cuda needs a CUDA GPU"),
    (["similarity/gradient-similarity-paraphrased-projected", "projection.fractions=[0.01,0.01]"], "must be distinct"),
    (["similarity/model-generated-lima", "paraphrased_data=null"], "kind=model-generated needs `model`"),
    (["similarity/layer-analysis-paraphrased", "dot_products=[]"], "give dot_products"),
    (["similarity/layer-analysis-paraphrased", "dot_products=[{experiment: instruct/dolly-pythia-2.8b}]"],
     "instruct/dolly-pythia-2.8b runs recipe instruct-sft, not layer-dot-products"),
    (["similarity/layer-analysis-paraphrased", "dot_products=[]", "source_dot_products={files: [/nonexistent], parameters: /x}"],
     "/x: cannot read the source's values.json"),
    (["similarity/paraphrased-lima", "generator.backend=openai", "generator.api_key_env=LLMREPRO_NO_SUCH_KEY"],
     "needs an API key in $LLMREPRO_NO_SUCH_KEY"),
])
def test_bad_inputs_fail_with_one_line(cli, tmp_path, args, message):
    code, _, err = cli("run", args[0], "--profile", "smoke", "--output-dir", str(tmp_path), *args[1:])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.rglob("*.partial"))


def test_answer_cut_as_the_source_did():
    """src/model_operations.py: after the first '\\n<|assistant|>\\n', up to the first EOS string, stripped; without
    an EOS, find() returns -1 and the last character is lost."""
    eos = "<|endoftext|>"
    assert make_variants.source_answer("<|user|>\nQ?\n<|assistant|>\n Paris. <|endoftext|>", eos) == "Paris."
    assert make_variants.source_answer("<|user|>\nQ?\n<|assistant|>\nParis is big", eos) == "Paris is bi"
    assert make_variants.source_answer("<|user|>\nQ\n<|assistant|>\nA\n<|user|>\nB\n<|assistant|>\nC<|endoftext|>", eos) == \
        "A\n<|user|>\nB\n<|assistant|>\nC"


def test_system_prompt_is_the_sources_with_its_whitespace():
    """src/paraphrasing.py: a triple-quoted string, opening and closing on their own lines, the first two lines
    ending with a space."""
    lines = make_variants.SYSTEM_PROMPT.split("\n")
    assert lines[0] == "" and lines[-1] == "" and len(lines) == 5
    assert lines[1].endswith("etc.) without altering the content. ") and lines[2].endswith("after the paraphrasing. ")
    assert lines[3] == "Just output the paraphrased text without any additional information."


def test_model_generated_answers_with_the_tulu_prompt_and_the_context_budget(tmp_path, cli):
    code, _, err = cli("run", "similarity/model-generated-lima", "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 0, err
    rows = [json.loads(line) for line in next(tmp_path.rglob("variants.jsonl")).read_text().splitlines()]
    from llmrepro.lm import fixtures, templates

    published = fixtures.rows("lima-paraphrased")[:4]
    assert [r["id"] for r in rows] == [r["id"] for r in published]
    assert [r["messages"][0] for r in rows] == [r["paraphrased_messages"][0] for r in published]
    assert all(r["kind"] == "model-generated" and r["dataset"] == "lima" for r in rows)
    cfg = catalog.load("similarity/model-generated-lima").resolve("smoke", ["max_new_tokens=context"])
    greedy = make_variants.Greedy(cfg.model, "context", None, templates.OPEN_INSTRUCT_TULU_TEMPLATE)
    assert greedy.budget(500) == greedy.model.config.max_position_embeddings - 500
    prompt = greedy.tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True,
                                                  tokenize=False, chat_template=greedy.template)
    assert prompt == "<|user|>\nQ?\n<|assistant|>\n"
    long = [{"role": "user", "content": "word " * 600}]  # a prompt that fills the context: empty answer
    assert greedy.reply(long) == ""


def test_make_variants_with_the_rules_generator_keeps_lima_rows_and_rewords_them(tmp_path, cli):
    """The success path without a model: every LIMA row with two messages (and only those), reworded by the word
    rules, written in order with its id; what gradient-similarity then reads as `variants`."""
    from llmrepro.lm import fixtures
    from llmrepro.lm.fixtures.chat import rules_paraphrase

    code, _, err = cli("run", "similarity/paraphrased-lima", "--profile", "smoke", "--output-dir", str(tmp_path),
                       "generator.backend=rules", "generator.local=null")
    assert code == 0, err
    run = next((tmp_path / "similarity" / "paraphrased-lima").iterdir())
    rows = [json.loads(line) for line in (run / "variants.jsonl").read_text().splitlines()]
    source = fixtures.rows("tulu-v2")[:6]
    kept = [r for r in source if r["dataset"] == "lima" and len(r["messages"]) == 2]
    assert kept and len(kept) < len(source)  # the fixture's first rows mix in other datasets / turns
    assert rows == [{"id": r["id"], "dataset": "lima", "kind": "paraphrased", "messages": [
        {"role": "user", "content": rules_paraphrase(r["messages"][0]["content"])},
        {"role": "assistant", "content": rules_paraphrase(r["messages"][1]["content"])}]} for r in kept]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["samples"], metrics["skipped_rows"], metrics["empty_answers"]) == (len(kept), 6 - len(kept), 0)


def test_full_gradient_similarity_success_path(tmp_path, cli):
    """similarities.json in the source's layout ({variant id: {candidate id: cosine}}, 5 BM25 candidates with the
    true original last unless BM25 ranked it), the metrics recomputed from it, and one cosine recomputed from two
    per-sample gradients taken one sample at a time with plain autograd."""
    import torch

    from llmrepro.gradients import encoding, pairs
    from llmrepro.lm import data
    from llmrepro.lm.models import load_model, load_tokenizer

    code, _, err = cli("run", "similarity/gradient-similarity-paraphrased", "--profile", "smoke",
                       "--output-dir", str(tmp_path))
    assert code == 0, err
    run = next((tmp_path / "similarity" / "gradient-similarity-paraphrased").iterdir())
    sims = json.loads((run / "similarities.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(sims) == metrics["samples"] == 12 and all(len(c) == 5 for c in sims.values())
    assert all(p in c for p, c in sims.items())  # the true original is always among the candidates
    best = [max(c, key=c.get) == p for p, c in sims.items()]
    assert metrics["accuracy"] == pytest.approx(sum(best) / len(best))

    cfg = catalog.load("similarity/gradient-similarity-paraphrased").run_spec("smoke").cfg
    tok = load_tokenizer(cfg.model)
    pairs.force_template(tok, "tulu")
    model = load_model(cfg.model).eval()
    originals = {r["id"]: r for r in pairs.lima_rows(data.load_rows(cfg.data), cfg.dataset_filter)}
    variants = {r["id"]: r for r in pairs.variant_rows(data.load_rows(cfg.variants_data), cfg.variants_data.format,
                                                       cfg.variants_data.name)}
    p_id = next(iter(sims))
    o_id = min(sims[p_id], key=sims[p_id].get)  # the least similar candidate: far from 1 whatever the model

    def grad(row):
        ex = encoding.encode(row, "chat", tok, "sft", 10**9)
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_p, g_o = grad(variants[p_id]), grad(originals[o_id])
    assert sims[p_id][o_id] == pytest.approx(torch.nn.functional.cosine_similarity(g_p, g_o, dim=0).item(), abs=1e-4)


def test_compare_puts_two_smoke_runs_next_to_the_published_figures(tmp_path, cli):
    """`llmrepro compare` over the paraphrased and model-generated smoke runs: one row per run and referenced
    metric, the measured value from each run's metrics.json, the published one from the YAML, their difference."""
    exps = ["similarity/gradient-similarity-paraphrased", "similarity/gradient-similarity-model-generated"]
    dirs = []
    for exp in exps:
        code, _, err = cli("run", exp, "--profile", "smoke", "--output-dir", str(tmp_path))
        assert code == 0, err
        dirs.append(next((tmp_path / exp).iterdir()))
    code, out, err = cli("compare", *map(str, dirs), "--references-only", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    expected = []
    for exp, run in zip(exps, dirs, strict=True):
        metrics = json.loads((run / "metrics.json").read_text())
        for ref in catalog.load(exp).spec.reference:
            expected.append((exp, ref.metric, metrics[ref.metric], ref.value, ref.where))
    got = [(r["experiment"], r["metric"], r["measured"], r["published"], r["published in"]) for r in rows]
    assert sorted(got) == sorted(expected) and len(got) == len(expected)
    assert all(r["diff"] == pytest.approx(r["measured"] - r["published"]) for r in rows)
    code, out, _ = cli("compare", *map(str, dirs), "--references-only", "--format", "markdown")
    header = out.splitlines()[0]
    assert header == "| experiment | run | profile | metric | measured | published | diff | published in |"
    assert len(out.splitlines()) == 2 + len(expected)
