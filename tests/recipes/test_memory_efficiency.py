"""memory-efficiency, fused-step-timing and memory-report: each against what the source's code does, re-computed
independently (templates, trl's completion mask, the seeded sampler order, the schedules, one SGD step with
clipping, the notebook's bootstrap), plus real smoke runs, the report's table and one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from llmrepro.lm import fixtures, templates
from llmrepro.lm.models import ModelConfig, load_tokenizer
from llmrepro.recipes import memory_efficiency as me

EXP = "memory_efficiency/opt-125m-fused-sgd"
FAMILY = "memory_efficiency"


def _run_dir(tmp_path, exp, out):
    return tmp_path / exp / out.strip().splitlines()[-1].split("/")[-1]


def _sampler_order(n: int, seed: int = 42) -> list[int]:
    """What torch does after transformers' set_seed(seed) at Trainer init: the DataLoader iterator draws its base
    seed from the global generator, then RandomSampler draws the seed of its own generator and permutes."""
    torch.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_()
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed)).tolist()


def _source_profiled_steps(profile_n_steps: int = 5, steps: int = 10) -> int:
    """profiler_callbacks.ProfilerCallbackBase re-run: the counter starts at 0 in on_epoch_begin; on_step_end
    steps the profiler, stops it once counter > profile_n_steps - 1, then increments the counter."""
    counter, recorded = 0, 0
    for _ in range(steps):
        recorded += 1
        if counter > profile_n_steps - 1:
            return recorded
        counter += 1
    return recorded


# --- what the source ran, re-computed ---------------------------------------------------------------------

def test_fused_smoke_run_as_the_source(cli, tmp_path):
    """--test --profile, measured in a fresh process as the real runs are: 10 steps of one row in the seeded
    sampler's order, CosineAnnealingLR(T_max=10) from 1e-3, the profiler over the first 6 steps and its files;
    no gradient alive at the fused run's peak."""
    code, out, _ = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), "fresh_process=true")
    assert code == 0
    run = _run_dir(tmp_path, EXP, out)
    m = json.loads((run / "metrics.json").read_text())
    steps = json.loads((run / "steps.json").read_text())
    assert m["steps"] == 10 and m["profile_steps"] == _source_profiled_steps() == 6
    assert m["rows_without_response"] == 0
    assert steps["rows"] == [[i] for i in _sampler_order(10)]
    assert steps["learning_rate"] == pytest.approx([1e-3 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(10)])
    assert m["optimizer_state_mb"] == 0 and m["timeline_peak_gradient_mb"] == 0
    assert m["timeline_peak_parameter_mb"] == pytest.approx(m["param_mb"], rel=1e-3)
    assert m["step_time_s"] > 0 and m["peak_memory_mb"] >= m["model_memory_mb"] > 0
    assert m["max_memory_allocated_gib"] is None or m["max_memory_allocated_gib"] > 0  # CUDA only
    timeline = json.loads((run / "memory_timeline.json").read_text())
    assert set(timeline["mb"]) >= {"parameter", "optimizer_state", "gradient", "activation"}
    assert (run / "memory_timeline.png").stat().st_size > 0 and (run / "trace.json.gz").stat().st_size > 0
    assert not (run / "checkpoints").exists()  # no checkpoint in test mode (save_checkpoint: false)


def test_lima_rows_filter_multi_turn_and_take_the_first():
    rows = fixtures.rows("gair-lima")
    kept = [r for r in rows if r["source"] != "multi_turn"][:10]
    assert [r["source"] for r in rows[:10]].count("multi_turn") == 2  # the filter changes which rows come first
    assert me.select_rows(rows, "lima", 10) == [
        [{"role": "user", "content": r["conversations"][0]}, {"role": "assistant", "content": r["conversations"][1]}]
        for r in kept]


def test_templates_render_the_source_texts():
    tok = load_tokenizer(ModelConfig(name="tiny-opt", special_tokens={"sep_token": "<SEP>"}))
    chat = [{"role": "user", "content": " What is the capital of Peru?\n"}, {"role": "assistant", "content": "Lima. "}]
    render = lambda name: tok.apply_chat_template(chat, chat_template=templates.CHAT_TEMPLATES[name],  # noqa: E731
                                                  tokenize=False, add_generation_prompt=True)
    eos = tok.eos_token
    assert render("opt-sep") == f"What is the capital of Peru? <SEP>Lima. {eos}"
    assert render("llama-2-no-bos") == f"[INST] What is the capital of Peru? [/INST] Lima. {eos}"


def _trl_labels(input_ids: torch.Tensor, pad_id: int, response_ids: list[int], instruction_ids: list[int] | None):
    """trl 0.7.11's DataCollatorForCompletionOnlyLM.torch_call, re-computed: labels = ids with padding -100, then
    without an instruction template everything through the LAST response template is masked; with one, from
    the start through the first response template (single-turn rows)."""
    labels = input_ids.clone()
    labels[labels == pad_id] = -100
    for i in range(len(labels)):
        row = labels[i].tolist()
        hits = [j for j in range(len(row)) if row[j:j + len(response_ids)] == response_ids]
        if not hits or (instruction_ids and not any(row[j:j + len(instruction_ids)] == instruction_ids
                                                    for j in range(len(row)))):
            labels[i] = -100
            continue
        end = (hits[0] if instruction_ids else hits[-1]) + len(response_ids)
        labels[i, :end] = -100
    return labels


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("template, model, special", [("opt-sep", "tiny-opt", {"sep_token": "<SEP>"}),
                                                      ("llama-2-no-bos", "tiny-llama", {"pad_token": "<pad>"})])
def test_completion_mask_matches_trls_token_search(template, model, special, padding_side):
    tok = load_tokenizer(ModelConfig(name=model, special_tokens=special))
    tok.padding_side = padding_side
    rows = me.select_rows(fixtures.rows("gair-lima"), "lima", 6)
    features = me.encode(rows, tok, template, max_length=48)  # the longest rows lose their end, not their marker
    batch = me.Collator(tok)(features)
    instruction, response = templates.COMPLETION_MARKERS[template]
    # the marker's ids as they stand in the text: <SEP> is one added token; the tiny byte-level BPE tokenizes
    # " [/INST]" (after a space) as its own pieces, as Llama's sentencepiece does for "[/INST]"
    response_ids = tok.encode(response if template == "opt-sep" else " " + response, add_special_tokens=False)
    instruction_ids = tok.encode(instruction, add_special_tokens=False) if instruction else None
    assert torch.equal(batch["labels"], _trl_labels(batch["input_ids"], tok.pad_token_id, response_ids, instruction_ids))
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    answer = tok.encode((" " if template == "llama-2-no-bos" else "") + rows[0][1]["content"] + " " + tok.eos_token,
                        add_special_tokens=False)
    assert trained == answer  # the answer and the EOS, nothing of the prompt


def test_percentile_bootstrap_as_the_notebook():
    values = [1.0, 1.5, 0.5, 2.0, 1.25, 0.75, 3.0]
    from llmrepro.lm import mc  # what the time test uses

    low, high = mc.bootstrap_ci(values, alpha=0.05, k=2000, seed=7)
    draws = np.random.default_rng(7).choice(np.array(values), (2000, len(values)), replace=True)
    means = sorted(sum(row) / len(row) for row in draws.tolist())
    assert (low, high) == pytest.approx((means[50], means[1950]))  # floor(2000 * .025), ceil(2000 * .975)
    assert low < np.mean(values) < high


@pytest.mark.parametrize("method", ["backprop", "fused"])
def test_one_step_equals_a_hand_computed_sgd_step(tmp_path, method):
    """One row, one step, then the checkpoint: backprop clips the gradient to norm 1.0 and steps at 5e-5 (the
    Trainer's defaults), the fused step uses 1e-3 without clipping; both from the same seeded model (tiny-llama
    with its added <pad> row: no dropout, so the step does not depend on the generator's state)."""
    from transformers import AutoModelForCausalLM, set_seed

    from llmrepro.core import catalog
    from llmrepro.lm.models import load_model

    exp = catalog.load(f"{FAMILY}/llama-2-7b-{method}-sgd")
    cfg = me.Config.model_validate(exp.params("smoke", ["train.rows=1", "train.save_checkpoint=true",
                                                        "train.profile_steps=0"]))
    me.measure({"config": cfg.model_dump(mode="json"), "out_dir": str(tmp_path)})
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "checkpoint-1")

    tok = load_tokenizer(cfg.model)
    batch = me.Collator(tok)(me.encode(me.select_rows(fixtures.rows("gair-lima"), "lima", 1), tok, cfg.template,
                                       cfg.train.max_length))
    set_seed(cfg.seed)
    model = load_model(cfg.model, tokenizer=tok)
    model(**batch).loss.backward()
    grads = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > 1  # so that clipping changes the step
    scale, lr = (min(1.0, 1 / (norm + 1e-6)), 5e-5) if method == "backprop" else (1.0, 1e-3)
    with torch.no_grad():
        expected = [p - lr * scale * g for p, g in zip(model.parameters(), grads, strict=True)]
    for (name, got), want in zip(trained.named_parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("exp", ["opt-125m-fused-sgd-time", "opt-125m-backprop-sgd-time"])
def test_time_test_as_the_source(cli, tmp_path, exp):
    """trials x trainer.train() of one step on all 10 rows; the first dropped; the fused run's CosineAnnealingLR
    carries over between trials while the Trainer's own cosine schedule restarts."""
    code, out, _ = cli("run", f"{FAMILY}/{exp}", "--profile", "smoke", "--output-dir", str(tmp_path), "time_test.trials=4")
    assert code == 0
    run = _run_dir(tmp_path, f"{FAMILY}/{exp}", out)
    m = json.loads((run / "metrics.json").read_text())
    steps = json.loads((run / "steps.json").read_text())
    trials = [float(x) for x in (run / "time_test.txt").read_text().split()]
    assert len(trials) == 4 and m["trials_kept"] == 3 and m["steps"] == 4
    assert m["trial_time_s"] == pytest.approx(sum(trials[1:]) / 3)
    # with 3 kept trials each of the 27 equally likely resamples has probability 1/27 > 2.5%, so the bootstrap's
    # 2.5% and 97.5% points are the all-fastest and all-slowest resamples: the fastest and slowest kept trial
    assert (m["trial_time_ci_low"], m["trial_time_ci_high"]) == pytest.approx((min(trials[1:]), max(trials[1:])))
    assert all(sorted(r) == list(range(10)) for r in steps["rows"])  # one batch of the 10 rows per trial
    expected = ([1e-3 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(4)] if "fused" in exp else [5e-5] * 4)
    assert steps["learning_rate"] == pytest.approx(expected)
    assert not (run / "checkpoints").exists()  # saved in every trial, deleted at the end (keep_checkpoints)
    assert set(m["reference"]) == {"trial_time_s", "trial_time_ci_low", "trial_time_ci_high"}


def test_lora_on_opt_trains_q_k_v_only(tmp_path):
    """The source's targets name o_proj, which OPT does not have: peft adapts q/k/v alone."""
    from llmrepro.core import catalog

    cfg = me.Config.model_validate(catalog.load(f"{FAMILY}/opt-125m-lora-8bit").params("smoke", ["train.rows=2"]))
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    m = me.measure({"config": cfg.model_dump(mode="json"), "out_dir": str(tmp_path)})
    hidden, layers, r = 64, 2, 16  # tiny-opt
    assert m["trainable_params"] == layers * 3 * 2 * hidden * r


def test_llama_gets_a_pad_row_and_opt_does_not_grow():
    from llmrepro.lm.models import load_model

    for name, special, rows in (("tiny-llama", {"pad_token": "<pad>"}, 1025), ("tiny-opt", {"sep_token": "<SEP>"}, 1025)):
        cfg = ModelConfig(name=name, special_tokens=special)
        tok = load_tokenizer(cfg)
        model = load_model(cfg, tokenizer=tok)
        assert model.get_input_embeddings().num_embeddings == len(tok) == rows
    assert model.config.pad_token_id == 1  # OPT's pad token was already there: not the new row


def test_backprop_supports_accumulation_clipping():
    cfg = me.Config.model_validate(_params("backprop", gradient_accumulation_steps=2, max_grad_norm=1.0))
    assert cfg.train.gradient_accumulation_steps == 2


def _params(method, **train):
    return {"model": {"name": "tiny-opt", "special_tokens": {"sep_token": "<SEP>"}},
            "data": {"name": "fixture:gair-lima", "format": "lima"}, "template": "opt-sep",
            "train": {"method": method, "max_grad_norm": 0 if method == "fused" else 1.0, **train}}


@pytest.mark.parametrize("override, words", [
    ("train.gradient_accumulation_steps=4", "cannot accumulate gradients"),
    ("train.max_grad_norm=1.0", "cannot clip gradients"),
    ("train.mixed_precision=fp16", "cannot use mixed-precision grad scaling"),
    ("train.lr_scheduler=wobbly", "unknown scheduler"),
    ("model.quantization=8bit", "a quantized model cannot be fine-tuned in full"),
    ("model.gradient_checkpointing=true", "set train.gradient_checkpointing"),
    ("data.format=dolly", "use format lima"),
    ("train.rows=50", "the data has 12 single-turn rows; train.rows asks for 50"),
    ("time_test.trials=5", "the time test runs without the profiler"),
])
def test_bad_combinations_fail_in_one_line(cli, tmp_path, override, words):
    code, out, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), override)
    assert code == 2 and words in err and err.count("\n") == 1
    assert not list((tmp_path / EXP).glob("*/metrics.json"))


def test_fused_under_ddp_fails(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 2 and "cannot run under distributed data parallel" in err


def test_8bit_without_gpu_fails_in_one_line(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli("run", f"{FAMILY}/opt-125m-lora-8bit", "--profile", "smoke", "--output-dir",
                       str(tmp_path), "model.quantization=8bit")
    assert code == 2 and err == "llmrepro: error: model.quantization=8bit needs a CUDA GPU (bitsandbytes); none is available\n"
    assert not list(tmp_path.rglob("metrics.json"))


# --- the small net (backprop_trick.py's __main__) ---------------------------------------------------------

def test_small_net_as_the_source():
    """Its param groups and betas, and: the fused optimizer trains exactly like Adam from the same weights and
    the same stream of fresh (x, y) draws (the source's consistency_check)."""
    from llmrepro.recipes import fused_step_timing as fst

    cfg = fst.Config()
    torch.manual_seed(0)
    setups = fst.optimizers(cfg, "cpu")
    (net_a, standard), (net_b, fused) = setups["standard"], setups["fused"]
    assert [(g["lr"], g["betas"], len(g["params"])) for g in standard.param_groups] == [
        (0.1, (0.9, 0.999), 4), (0.01, (0.1, 0.12), 2)]
    assert [(g["lr"], g["betas"]) for g in fused.param_groups] == [(0.1, (0.9, 0.999)), (0.01, (0.1, 0.12))]
    assert len(fused.optimizers) == 6  # one Adam per parameter tensor, as MotherOptimizer
    assert not torch.equal(net_a.dense_1.weight, net_b.dense_1.weight)  # built one after the other
    net_b.load_state_dict(net_a.state_dict())
    for net, opt in ((net_a, standard), (net_b, fused)):
        torch.manual_seed(1)
        fst.timing(net, opt, 30, "cpu")
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_small_net_timing_smoke(cli, tmp_path):
    exp = f"{FAMILY}/small-net-timing"
    code, out, _ = cli("run", exp, "--profile", "smoke", "--output-dir", str(tmp_path), "iterations=10", "repeat=2")
    assert code == 0
    run = _run_dir(tmp_path, exp, out)
    m = json.loads((run / "metrics.json").read_text())
    times = json.loads((run / "times.json").read_text())
    assert m["iterations_per_measurement"] == 20 and [len(v) for v in times.values()] == [2, 2]
    assert m["standard_time_s"] == pytest.approx(sum(times["standard"]) / 2)
    assert m["time_ratio"] == pytest.approx(m["fused_time_s"] / m["standard_time_s"])
    assert m["reference"]["time_ratio"]["published"] == 1.7


# --- the report --------------------------------------------------------------------------------------------

def _fake_run(root, exp, method, optimizer, metrics, lora=False, partial=False, reference=None):
    """A finished (or unfinished) run of `exp`'s smoke profile where the report looks for it."""
    from llmrepro.core import catalog

    spec = catalog.load(exp).run_spec("smoke")
    run = root / exp / (spec.default_run_id + (".partial" if partial else ""))
    run.mkdir(parents=True)
    model = {"name": "tiny-opt", "lora": {"r": 16} if lora else None, "quantization": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "memory-efficiency", "params": {
        "model": model, "train": {"method": method, "optimizer": optimizer, "batch_size": 1}}}))
    (run / "manifest.json").write_text(json.dumps({"status": "running" if partial else "complete", "experiment": exp,
                                                   "run_id": spec.default_run_id, "config_hash": spec.config_hash}))
    (run / "metrics.json").write_text(json.dumps({**metrics, "reference": reference or {}}))


def test_report_tables_finished_runs_with_published_figures(cli, tmp_path):
    _fake_run(tmp_path, f"{FAMILY}/opt-125m-backprop-sgd", "backprop", "sgd",
              {"peak_memory_mb": 600.0, "max_memory_allocated_gib": 0.5, "step_time_s": 0.5})
    _fake_run(tmp_path, f"{FAMILY}/llama-2-7b-fused-sgd-b16", "fused", "sgd",
              {"peak_memory_mb": 350.25, "max_memory_allocated_gib": 40.0, "max_memory_reserved_gib": 47.0},
              reference={"max_memory_allocated_gib": {"published": 41.12},
                         "max_memory_reserved_gib": {"published": 48.06}})
    _fake_run(tmp_path, f"{FAMILY}/opt-125m-lora-8bit", "backprop", "adamw", {"peak_memory_mb": 1.0}, lora=True,
              partial=True)
    code, out, _ = cli("run", f"{FAMILY}/report", "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 0
    run = _run_dir(tmp_path, f"{FAMILY}/report", out)
    report = (run / "report.md").read_text().splitlines()
    assert report[2].startswith("| experiment | model | variant | peak memory (MB) | max allocated (GiB) | published |")
    assert report[4] == f"| {FAMILY}/opt-125m-backprop-sgd | tiny-opt | backprop + sgd, batch 1 | 600 | 0.5 |  |  |  |  | 0.5 |  |  |"
    assert report[5] == f"| {FAMILY}/llama-2-7b-fused-sgd-b16 | tiny-opt | fused + sgd, batch 1 | 350.2 | 40 | 41.12 | 47 | 48.06 |  |  |  |  |"
    assert report[-1].startswith(f"Not run yet: {FAMILY}/opt-125m-backprop-adamw, ")
    assert "opt-125m-lora-8bit" in report[-1]  # an unfinished (.partial) run does not count
    assert json.loads((run / "metrics.json").read_text()) == {"runs_found": 2, "runs_missing": 20}
    assert (run / "report.png").stat().st_size > 0


# --- every experiment of the family says what the source did ---------------------------------------------

def test_every_yaml_header_names_the_source_file_and_commit():
    from llmrepro.core import catalog

    names = [n for n in catalog.names() if n.startswith(f"{FAMILY}/")]
    assert len(names) == 24
    for name in names:
        lines = catalog.load(name).path.read_text().splitlines()
        header = "\n".join(line for line in lines[:lines.index(next(x for x in lines if not x.startswith("#")))])
        assert lines[0] == f"# llmrepro run {name}"
        assert "MikkelGodsk/Masters-thesis @ b51c7f1" in header, name
        assert any(f in header for f in ("src/finetune.py", "src/backprop_trick.py", "timing_experiment_CIs.ipynb")), name
        assert "Deliberate differences" in header or name.endswith("/report"), name


def test_recipe_docstrings_list_their_deliberate_differences():
    from llmrepro.recipes import fused_step_timing, memory_report

    for module in (me, fused_step_timing, memory_report):
        assert "Deliberate differences from the source" in module.__doc__, module.__name__
