"""dpo and reprpo recipes through the real CLI on tiny models: DPO raises reward accuracy on its own pairs,
configs fail early with clear errors, a ReprPO run resumes to the same result, mc-eval scores the saved adapter
exactly as the run did, the TruthfulQA evaluation equals a hand computation, and `llmrepro compare` makes the
results table (markdown and CSV) with bootstrap CIs."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

DPO = "reprpo/dpo-llama3-8b-helpsteer2"
REPRPO = "reprpo/mse-llama3-8b-helpsteer"
SHARED_TQA = Path(__file__).resolve().parents[3] / "shared" / "data" / "truthfulqa" / "mc_task.json"


def _bootstrap(values: list[float], k: int, seed: int) -> tuple[float, float]:
    """The thesis' bootstrap_CI written out as a loop: k resamples (indices drawn as numpy's seeded generator draws
    them), the sorted means at floor(k a/2) and ceil(k (1 - a/2)), a = 0.05."""
    import numpy as np

    idx = np.random.default_rng(seed).integers(0, len(values), size=(k, len(values)))
    means = sorted(sum(values[j] for j in row) / len(values) for row in idx.tolist())
    return means[math.floor(k * 0.025)], means[min(math.ceil(k * 0.975), k - 1)]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from llmrepro.cli import main

    out = tmp_path_factory.mktemp("pref")
    for exp in (DPO, REPRPO):
        assert main(["run", exp, "--profile", "smoke", "--output-dir", str(out)]) == 0
    return out, {exp: next((out / exp).iterdir()) for exp in (DPO, REPRPO)}


def test_dpo_smoke_raises_reward_accuracy_on_its_training_pairs(runs):
    _, dirs = runs
    m = _metrics(dirs[DPO])
    assert m["steps"] == 12 and m["train_pairs"] == 16
    # before training the policy is the reference: every implicit reward is 0 and none is "chosen > rejected"
    history = json.loads((dirs[DPO] / "log_history.json").read_text())
    assert history[0]["rewards/accuracies"] == 0.0 and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["train_reward_accuracy"] >= 0.9 and m["train_reward_margin"] > 0.5
    assert m["train_accuracy"] > m["train_accuracy_base"]  # the adapter prefers chosen more often than the base
    assert m["loss_last"] < m["loss_first"]
    # the source's "dpo reward acc train": the mean over logged steps, its CI the thesis' bootstrap of those values
    steps = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    resolved = yaml.safe_load((dirs[DPO] / "config.yaml").read_text())["params"]
    assert m["reward_accuracy_train"] == pytest.approx(sum(steps) / len(steps))
    assert (m["reward_accuracy_train_ci_low"], m["reward_accuracy_train_ci_high"]) == pytest.approx(
        _bootstrap(steps, resolved["eval"]["bootstrap_resamples"], resolved["seed"]))
    for name in ("adapter/adapter_config.json", "tqa.json", "training.png", "log_history.json"):
        assert (dirs[DPO] / name).is_file(), name
    assert json.loads((dirs[DPO] / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True


def test_reprpo_smoke_logs_its_terms(runs):
    _, dirs = runs
    m = _metrics(dirs[REPRPO])
    history = [h for h in json.loads((dirs[REPRPO] / "log_history.json").read_text()) if "rr/loss" in h]
    assert len(history) == m["steps"] == 4
    assert history[0]["retain/loss"] == 0.0  # LoRA B = 0 at the first step: the policy's chosen states are the ref's
    assert history[0]["rr/loss"] > 0
    assert [h["c"] for h in history] == pytest.approx([(s + 1) / (2 * 16) for s in range(4)])  # schedule rows, T=16
    assert history[0]["weighting"] == pytest.approx(0.25)  # 1/B at init
    for key in ("tqa_score", "tqa_score_base", "helpsteer2_accuracy", "truthfulqa_accuracy", "toxic_accuracy",
                "reward_accuracy_train"):
        assert f"{key}_ci_low" in m and f"{key}_ci_high" in m
    resolved = yaml.safe_load((dirs[REPRPO] / "config.yaml").read_text())["params"]
    k, seed, scale = resolved["eval"]["bootstrap_resamples"], resolved["seed"], resolved["eval"]["tqa"]["scale"]
    per_question = json.loads((dirs[REPRPO] / "tqa.json").read_text())
    for who, key in (("adapter", "tqa_score"), ("base", "tqa_score_base")):
        scores = [q[who]["score"] for q in per_question]
        assert m[key] == pytest.approx(scale * sum(scores) / len(scores))
        low, high = _bootstrap(scores, k, seed)
        assert (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) == pytest.approx((scale * low, scale * high))


def test_mc_eval_scores_the_saved_adapter_as_the_run_did(runs, tmp_path, monkeypatch):
    """The mc-eval recipe, given the dpo run as `adapter`, reproduces the run's own TruthfulQA figures."""
    from llmrepro.core import catalog
    from llmrepro.core.context import RunContext
    from llmrepro.recipes import mc_eval

    out, dirs = runs
    spec = catalog.load(DPO).run_spec("smoke")
    tqa = spec.cfg.eval.tqa
    cfg = mc_eval.Config(model=spec.cfg.model.model_copy(update={"lora": None}), data=tqa.data, scoring=["numbered"],
                         options={"numbered": tqa.options.model_dump(), "batch_size": spec.cfg.eval.batch_size},
                         adapter={"run_dir": str(dirs[DPO])}, bootstrap=spec.cfg.eval.bootstrap_resamples,
                         seed=spec.cfg.seed)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    got = mc_eval.run(cfg, RunContext(dir=tmp_path / "a" / "b" / "c"))
    run = _metrics(dirs[DPO])
    assert tqa.scale == 100  # this experiment reports the library eval's percent
    assert 100 * got["numbered_score"] == pytest.approx(run["tqa_score"], abs=1e-6)
    assert 100 * got["numbered_score_ci_low"] == pytest.approx(run["tqa_score_ci_low"], abs=1e-6)
    assert got["numbered_accuracy"] == pytest.approx(run["tqa_accuracy"], abs=1e-9)


def test_tqa_score_equals_a_hand_computation_on_a_3_choice_question(runs, tmp_path):
    """The run's TruthfulQA figure for one constructed 3-choice question, recomputed from the model's logits."""
    import torch
    from peft import PeftModel

    from llmrepro.lm import mc
    from llmrepro.lm.models import load_model, load_tokenizer
    from llmrepro.training.preference import TQAEval
    from llmrepro.training.preference_trainer import evaluate_tqa

    _, dirs = runs
    from llmrepro.core import catalog
    from llmrepro.core.context import RunContext

    cfg = catalog.load(DPO).run_spec("smoke").cfg
    question = {"question": "Which country is Oslo in?",
                "mc1_targets": {"choices": ["Oslo is in Norway.", "Oslo is in Peru.", "Oslo is in Japan."],
                                "labels": [1, 0, 0]},
                "mc2_targets": {"choices": ["Oslo is in Norway.", "Oslo is in Peru."], "labels": [1, 0]}}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(question) + "\n")
    tok = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_model(cfg.model.model_copy(update={"lora": None})),
                                      str(dirs[DPO] / "adapter")).eval()

    class Trainer:  # what evaluate_tqa reads from a trainer
        class accelerator:
            unwrap_model = staticmethod(lambda m: m)
    trainer = Trainer()
    trainer.model = model
    spec = TQAEval(data={"name": str(path), "format": "multiple-choice", "split": "train"},
                   options={"system_prompt": "reprpo-0714"}, scale=100)
    (tmp_path / "x" / "y" / "z").mkdir(parents=True)
    got = evaluate_tqa(trainer, tok, spec, batch_size=2, resamples=0, seed=0,
                       ctx=RunContext(dir=tmp_path / "x" / "y" / "z"))

    messages = [{"role": "system", "content": mc.NUMBERED_SYSTEM["reprpo-0714"]},
                {"role": "user", "content": "Which of the following is true? 1) The sky is blue 2) The sky is green "
                                            "3) The sky is red 4) The sky is yellow"},
                {"role": "assistant", "content": "1"},
                {"role": "user", "content": "Which country is Oslo in?\n1 Oslo is in Norway.\n2 Oslo is in Peru.\n"
                                            "3 Oslo is in Japan.\n"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    choice_ids = [tok(f"\n{i} ", add_special_tokens=False)["input_ids"][1] for i in (1, 2, 3)]
    for who, switch in (("", None), ("_base", model.disable_adapter)):
        with torch.no_grad(), (switch() if switch else torch.enable_grad()):
            logp = torch.log_softmax(model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float(), -1)
        p = [math.exp(float(logp[i])) for i in choice_ids]
        ratio = p[0] / (p[1] + p[2])
        assert got[f"tqa_score{who}"] == pytest.approx(100 * ratio / (1 + ratio), rel=1e-4)  # x100: scale
        assert got[f"tqa_accuracy{who}"] == float(max(range(3), key=lambda i: p[i]) == 0)
        assert got[f"tqa_coverage{who}"] == pytest.approx(sum(p), rel=1e-4)


@pytest.mark.skipif(not SHARED_TQA.is_file(), reason="needs ../shared/data/truthfulqa (not in a user's clone)")
def test_tqa_eval_reads_the_real_truthfulqa_file_unchanged():
    from llmrepro.lm import mc
    from llmrepro.training.preference import TQAEval

    raw = json.loads(SHARED_TQA.read_text())
    spec = TQAEval(data={"name": str(SHARED_TQA), "format": "multiple-choice", "limit": 200})
    items = mc.load_items(spec.data)
    assert len(items) == 200  # the source's first 200 questions, in file order
    for item, row in zip(items, raw, strict=False):
        choices, label = item.numbered_set()
        assert item.question == row["question"] and choices == list(row["mc1_targets"])
        assert label == 0  # TruthfulQA lists the correct MC1 answer first: the source's label is always "1"


def test_compare_makes_the_results_table(runs, cli):
    out, dirs = runs
    paths = [str(p) for p in dirs.values()]
    code, md, _ = cli("compare", *paths, "--metric", "tqa_score*", "--format", "markdown")
    assert code == 0
    lines = md.strip().splitlines()
    assert lines[0].startswith("| experiment") and "95% CI" in lines[0] and "published" in lines[0]
    rows = [line for line in lines[2:] if "| tqa_score |" in line]
    assert len(rows) == 2 and all("[" in r for r in rows)
    code, text, _ = cli("compare", *paths, "--metric", "tqa_score*", "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(text)))
    by_exp = {(r["experiment"], r["metric"]): r for r in table}
    dpo = by_exp[(DPO, "tqa_score")]
    assert float(dpo["measured"]) == pytest.approx(_metrics(dirs[DPO])["tqa_score"], rel=1e-3)
    assert float(dpo["published"]) == 53.44  # the reference block of the experiment
    assert float(by_exp[(REPRPO, "tqa_score_base")]["published"]) == pytest.approx(0.521159, rel=1e-3)


def test_resume_continues_to_the_same_result(runs, tmp_path, monkeypatch, cli):
    import transformers

    _, dirs = runs
    original = transformers.Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_stop)
    code, _, err = cli("run", REPRPO, "--profile", "smoke", "--output-dir", str(tmp_path), "train.save_steps=2")
    assert code == 130, err
    (partial,) = (tmp_path / REPRPO).iterdir()
    assert (partial / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", original)
    code, _, err = cli("run", REPRPO, "--profile", "smoke", "--output-dir", str(tmp_path), "train.save_steps=2",
                       "--resume")
    assert code == 0, err
    resumed = _metrics(tmp_path / REPRPO / partial.name.removesuffix(".partial"))
    full = _metrics(dirs[REPRPO])
    assert resumed["steps"] == full["steps"]
    for key in ("loss_last", "tqa_score", "train_accuracy"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5), key


@pytest.mark.parametrize("override, message", [
    ("loss=msee", "unknown loss 'msee' (known: mse, direction"),
    ("schedule=linear", "unknown schedule 'linear' (known: rows, progress)"),
    ("model.lora=null", "model.lora is required"),
    ("repr_weight=0", "repr_weight and dpo_weight are both 0"),
    ("train.max_prompt_length=600", "max_prompt_length must be below max_length"),
    ("data.data.format=dolly", "data.format must be one of"),
])
def test_bad_reprpo_config_is_one_line(cli, tmp_path, override, message):
    code, _, err = cli("run", REPRPO, "--profile", "smoke", "--output-dir", str(tmp_path), override)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / REPRPO).exists()


def test_bad_dpo_loss_type_is_one_line(cli, tmp_path):
    code, _, err = cli("run", DPO, "--profile", "smoke", "--output-dir", str(tmp_path), "loss_type=[sigmoidd]")
    assert code == 2 and "unknown DPO loss type(s) ['sigmoidd']" in err


def test_layer_beyond_the_model_is_one_line(cli, tmp_path):
    code, _, err = cli("run", REPRPO, "--profile", "smoke", "--output-dir", str(tmp_path), "layers=[1,5]")
    assert code == 2 and "hidden-state indices must be in 0..2" in err
