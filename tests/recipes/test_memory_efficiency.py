"""memory-efficiency, fused-step-timing and memory-report recipes: real smoke runs, fused == backprop end to end,
the report's table, and one-line errors for bad combinations."""

from __future__ import annotations

import json

import pytest
import yaml

from llmrepro.recipes import memory_efficiency as me

EXP = "memory_efficiency/opt-125m-fused-adam"


def test_fused_smoke_run(cli, tmp_path):
    code, out, _ = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 0
    run = tmp_path / EXP / out.strip().split("/")[-1]
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 10 and m["peak_memory_mb"] > m["model_memory_mb"] > 0
    assert m["optimizer_state_mb"] == pytest.approx(2 * m["trainable_param_mb"])  # Adam: two states per parameter
    assert m["timeline_peak_gradient_mb"] == 0  # no gradient is alive at the fused run's peak
    assert m["timeline_peak_parameter_mb"] == pytest.approx(m["param_mb"], rel=1e-3)
    timeline = json.loads((run / "memory_timeline.json").read_text())
    assert set(timeline["mb"]) >= {"parameter", "optimizer_state", "gradient", "activation"}
    assert (run / "memory_timeline.png").stat().st_size > 0


def _params(method, optimizer="adam", **train):
    return {"model": {"name": "tiny-llama", "gradient_checkpointing": True},
            "data": {"name": "fixture:lima", "format": "chat"},
            "train": {"method": method, "optimizer": optimizer, "learning_rate": 1e-3, "max_length": 64,
                      "steps": 4, "profile_steps": 0, **train}}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_trains_like_backprop(tmp_path, optimizer):
    """Same losses step by step (the last one depends on every earlier update) with gradient checkpointing."""
    runs = {m: me.measure({"config": _params(m, optimizer), "out_dir": str(tmp_path)}) for m in ("backprop", "fused")}
    assert runs["fused"]["loss_last"] == pytest.approx(runs["backprop"]["loss_last"], abs=1e-6)
    assert runs["fused"]["loss_first"] == runs["backprop"]["loss_first"]
    assert runs["fused"]["loss_last"] != runs["backprop"]["loss_first"]


def test_backprop_supports_accumulation_clipping():
    cfg = me.Config.model_validate(_params("backprop", gradient_accumulation_steps=2, max_grad_norm=1.0))
    assert cfg.train.gradient_accumulation_steps == 2


@pytest.mark.parametrize("override, words", [
    ("train.gradient_accumulation_steps=4", "cannot accumulate gradients"),
    ("train.max_grad_norm=1.0", "cannot clip gradients"),
    ("train.mixed_precision=fp16", "cannot use mixed-precision grad scaling"),
    ("train.profile_steps=10", "profile_steps (10) must be below steps (10)"),
    ("train.lr_scheduler=wobbly", "unknown scheduler"),
    ("model.quantization=8bit", "a quantized model cannot be fine-tuned in full"),
])
def test_bad_combinations_fail_in_one_line(cli, tmp_path, override, words):
    code, out, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), override)
    assert code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / EXP).exists()


def test_fused_under_ddp_fails(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 2 and "cannot run under distributed data parallel" in err


def test_8bit_without_gpu_fails_in_one_line(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli("run", "memory_efficiency/opt-125m-lora-8bit", "--profile", "smoke", "--output-dir",
                       str(tmp_path), "model.quantization=8bit")
    assert code == 2 and err == "llmrepro: error: model.quantization=8bit needs a CUDA GPU (bitsandbytes); none is available\n"
    assert not list(tmp_path.rglob("metrics.json"))


def test_small_net_timing_smoke(cli, tmp_path):
    code, out, _ = cli("run", "memory_efficiency/small-net-timing", "--profile", "smoke", "--output-dir",
                       str(tmp_path), "iterations=20", "repeats=3")
    assert code == 0
    m = json.loads((tmp_path / "memory_efficiency/small-net-timing" / out.strip().split("/")[-1] / "metrics.json").read_text())
    assert m["max_param_diff"] <= 1e-6 and m["repeats"] == 3
    for name in ("standard", "fused", "time_ratio"):
        key = name if name == "time_ratio" else f"{name}_time_s"
        assert m[f"{key.removesuffix('_s')}_ci_low"] <= m[key] <= m[f"{key.removesuffix('_s')}_ci_high"]


def _fake_run(root, exp, method, optimizer, peak, step_time, lora=False, partial=False):
    """A finished (or unfinished) run of `exp`'s smoke profile where the report looks for it."""
    from llmrepro.core import catalog

    spec = catalog.load(exp).run_spec("smoke")
    run = root / exp / (spec.default_run_id + (".partial" if partial else ""))
    run.mkdir(parents=True)
    model = {"name": "tiny-opt", "lora": {"r": 16} if lora else None, "quantization": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "memory-efficiency", "params": {
        "model": model, "train": {"method": method, "optimizer": optimizer}}}))
    (run / "manifest.json").write_text(json.dumps({"status": "running" if partial else "complete", "experiment": exp,
                                                   "run_id": spec.default_run_id, "config_hash": spec.config_hash}))
    (run / "metrics.json").write_text(json.dumps({"peak_memory_mb": peak, "peak_above_model_mb": peak - 100,
                                                  "timeline_peak_total_mb": None, "step_time_s": step_time}))


def test_report_tables_finished_runs(cli, tmp_path):
    fam = "memory_efficiency"
    _fake_run(tmp_path, f"{fam}/opt-125m-backprop-sgd", "backprop", "sgd", 600.0, 0.5)
    _fake_run(tmp_path, f"{fam}/opt-125m-fused-sgd", "fused", "sgd", 350.25, 0.25)
    _fake_run(tmp_path, f"{fam}/opt-125m-lora-8bit", "backprop", "adam", 1.0, 1.0, lora=True, partial=True)
    code, out, _ = cli("run", f"{fam}/report", "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 0
    run = tmp_path / fam / "report" / out.strip().split("/")[-1]
    report = (run / "report.md").read_text().splitlines()
    assert report[4] == "| memory_efficiency/opt-125m-backprop-sgd | tiny-opt | backprop + sgd | 600 | 500 |  | 0.5 |"
    assert report[5] == "| memory_efficiency/opt-125m-fused-sgd | tiny-opt | fused + sgd | 350.2 | 250.2 |  | 0.25 |"
    assert report[-1].startswith("Not run yet: memory_efficiency/opt-125m-backprop-adam, ")
    assert "opt-125m-lora-8bit" in report[-1]  # an unfinished (.partial) run does not count
    assert json.loads((run / "metrics.json").read_text()) == {"runs_found": 2, "runs_missing": 8}
    assert (run / "report.png").stat().st_size > 0
    assert [d["experiment"] for d in json.loads((run / "manifest.json").read_text())["depends_on"]] == \
        [f"{fam}/opt-125m-backprop-sgd", f"{fam}/opt-125m-fused-sgd"]
