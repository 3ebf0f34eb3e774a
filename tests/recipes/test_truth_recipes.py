"""The truth recipes end to end on their smoke profiles (tiny models, fixtures), checked against independent
re-computations: probe accuracies, the intervention mc-eval applies, adapters, CE/KL, resumed caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmrepro.lm import mc
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
from llmrepro.representations import activations, probes
from llmrepro.representations.iti import Intervention, intervene

ACT = "truth/iti-activations-llama-2-7b-hf"
FAST_ITI = ["grid.alphas=[4.0]", "grid.k=[2]", "ood=[]", "bootstrap=0", "honest_llama=false"]


def run_dir(root, exp):
    (d,) = [p for p in (root / exp).iterdir() if not p.name.endswith(".partial")]
    return d


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("truth")


@pytest.fixture(scope="module")
def iti_run(out):
    from llmrepro.cli import main

    assert main(["run", ACT, "--profile", "smoke", "--output-dir", str(out)]) == 0
    assert main(["run", "truth/iti-llama-2-7b-hf", "--profile", "smoke", "--output-dir", str(out), *FAST_ITI]) == 0
    return run_dir(out, "truth/iti-llama-2-7b-hf")


def test_iti_run_writes_its_choice_grid_and_report(iti_run):
    chosen = json.loads((iti_run / "chosen.json").read_text())
    assert (chosen["alpha"], chosen["K"], chosen["model"]) == (4.0, 2, "tiny-llama")
    grid = json.loads((iti_run / "grid.json").read_text())
    assert grid["K"] == [2] and len(grid["p_true"]) == 1
    metrics = json.loads((iti_run / "metrics.json").read_text())
    assert metrics["iti_K"] == 2 and 0 < metrics["p_true_par3_iti"] < 1
    assert metrics["p_true_par3_delta"] == pytest.approx(metrics["p_true_par3_iti"] - metrics["p_true_par3_base"])
    assert (iti_run / "grid.png").read_bytes()[:4] == b"\x89PNG" and (iti_run / "head_accuracy.png").is_file()
    assert "## " not in (iti_run / "report.md").read_text()[:5] and "alpha = 4" in (iti_run / "report.md").read_text()
    iv = Intervention.load(iti_run / "intervention.npz")
    assert len(iv.heads) == 2 * 4 and np.allclose(np.linalg.norm(iv.directions, axis=1), 1)  # every head, ranked


def test_mc_eval_applies_the_iti_runs_intervention(cli, out, iti_run):
    ref = f"intervention.run_dir={iti_run}"
    code, _, err = cli("run", "truth/mc-eval-truthfulqa-smollm2", "--profile", "smoke", "--output-dir", str(out),
                       ref, "iti_alpha=40.0", "scoring=[thesis]", "text={name: 'fixture:plain-text', limit: 3, max_tokens: 24}")
    assert code == 0, err
    m = json.loads((run_dir(out, "truth/mc-eval-truthfulqa-smollm2") / "metrics.json").read_text())
    assert (m["iti_k"], m["iti_alpha"]) == (2, 40.0)
    cfg = ModelConfig(name="tiny-llama")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    items = mc.load_items(mc.MCData(name="fixture:truthfulqa-mc", limit=6))
    iv = Intervention.load(iti_run / "intervention.npz").top(2, 40.0)
    with intervene(model, iv):
        shifted = mc.score_thesis(model, tok, items, mc.ScoringOptions())
    base = mc.score_thesis(model, tok, items, mc.ScoringOptions())
    assert m["thesis_p_true"] == pytest.approx(np.mean([r["p_true"] for r in shifted]), abs=1e-6)
    assert m["thesis_p_true"] != pytest.approx(np.mean([r["p_true"] for r in base]), abs=1e-6)
    assert m["kl"] > 0 and m["ce"] > 0


def test_mc_eval_scores_a_peft_adapter(cli, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = ModelConfig(name="tiny-llama")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    code, _, err = cli("run", "truth/mc-eval-truthfulqa-smollm2", "--profile", "smoke", "--output-dir",
                       str(tmp_path / "o"), f"adapter_path={tmp_path / 'adapter'}", "scoring=[honest_llama]",
                       "text={name: 'fixture:plain-text', limit: 3, max_tokens: 24}")
    assert code == 0, err
    m = json.loads((run_dir(tmp_path / "o", "truth/mc-eval-truthfulqa-smollm2") / "metrics.json").read_text())
    items = mc.load_items(mc.MCData(name="fixture:truthfulqa-mc", limit=6))
    with torch.no_grad():
        rows = mc.score_honest_llama(peft.eval(), tok, items, mc.ScoringOptions())
    assert m["honest_llama_mc2"] == pytest.approx(np.mean([r["mc2"] for r in rows]), abs=1e-6)
    assert m["kl"] > 0  # adapter on vs disabled


def test_truth_probes_accuracies_equal_an_independent_cross_validation(cli, out, iti_run):
    code, _, err = cli("run", "truth/probes-llama-2-7b-chat-hf", "--profile", "smoke", "--output-dir", str(out),
                       f"activations={{run_dir: {run_dir(out, ACT)}}}", "train_on=null", "head_map=truthfulqa_mc",
                       "datasets=[truthfulqa_mc]", "probes=[logistic, mass-mean-iid]")
    assert code == 0, err
    run = run_dir(out, "truth/probes-llama-2-7b-chat-hf")
    result = json.loads((run / "probes.json").read_text())
    acts, y, groups = activations.load(run_dir(out, ACT), "truthfulqa_mc", "heads")
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    x = np.asarray(acts[:, 1], dtype=np.float32).reshape(len(y), -1)
    splits = StratifiedGroupKFold(3, shuffle=True, random_state=42).split(x, y, groups)
    pred = cross_val_predict(probes.logistic(42), x, y, cv=list(splits))
    assert result["datasets"]["truthfulqa_mc"]["probes"]["logistic"]["accuracy"][1] == pytest.approx((pred == y).mean())
    assert (run / "probe_accuracy.png").read_bytes()[:4] == b"\x89PNG" and (run / "head_accuracy.png").is_file()
    assert np.asarray(result["head_map"]["accuracy"]).shape == (2, 4)


def test_truth_probes_names_a_missing_dataset_in_one_line(cli, out, iti_run):
    code, _, err = cli("run", "truth/probes-llama-2-7b-chat-hf", "--profile", "smoke", "--output-dir", str(out),
                       f"activations={{run_dir: {run_dir(out, ACT)}}}", "datasets=[cities]", "train_on=null")
    assert code == 2 and "datasets cities are not in" in err and len(err.strip().splitlines()) == 1


def test_cache_activations_writes_shapes_statements_and_judgement(out, iti_run):
    run = run_dir(out, ACT)
    meta = json.loads((run / "activations" / "truthfulqa_mc" / "meta.json").read_text())
    heads = np.load(run / "activations" / "truthfulqa_mc" / "heads.npy", mmap_mode="r")
    assert list(heads.shape) == meta["shapes"]["heads"] == [64, 2, 4, 16]
    rows = (run / "activations" / "truthfulqa_mc" / "statements.jsonl").read_text().splitlines()
    assert len(rows) == 64 and json.loads(rows[0])["statement"] == "Q: Which country is Paris in?\nA: Paris is in France."


def test_resumed_caching_equals_an_uninterrupted_one(tmp_path):
    cfg = ModelConfig(name="tiny-opt")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    texts = [f"Statement number {i} is here." for i in range(7)]
    activations.cache(model, tok, texts, [i % 2 for i in range(7)], list(range(7)), tmp_path / "full", batch_size=2)
    part = tmp_path / "part"
    activations.cache(model, tok, texts, [i % 2 for i in range(7)], list(range(7)), part, batch_size=2)
    heads = np.lib.format.open_memmap(part / "heads.npy", mode="r+")
    heads[4:] = 0  # as if the run had stopped after 4 rows
    heads.flush()
    (part / "progress.json").write_text('{"rows": 4}')
    activations.cache(model, tok, texts, [i % 2 for i in range(7)], list(range(7)), part, batch_size=2, resume=True)
    assert np.array_equal(np.load(part / "heads.npy"), np.load(tmp_path / "full" / "heads.npy"))
