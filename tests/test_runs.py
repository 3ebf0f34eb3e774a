"""Run directories: atomic publish, failure marking, resume, no silent overwrite, manifest contents."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

from llmrepro import recipes, runs
from llmrepro.errors import UserError


@pytest.fixture(autouse=True)
def probe(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "probe", "probe_recipe")


def spec(**params) -> runs.RunSpec:
    return runs.RunSpec("fam/probe", "probe", params, profile="smoke", overrides=["value=3"])


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_successful_run_layout(tmp_path):
    final = runs.execute(spec(value=3.0), tmp_path)
    full = spec(value=3.0, seed=42, tracking=None, outcome="ok")  # the id hashes the validated params
    assert final == tmp_path / "fam" / "probe" / full.default_run_id
    assert final.name.startswith("smoke-") and len(final.name) == len("smoke-") + 10
    assert sorted(p.name for p in final.iterdir()) == ["artifact.txt", "config.yaml", "manifest.json",
                                                       "metrics.json", "run.log"]
    assert json.loads((final / "metrics.json").read_text()) == {"value": 6.0, "resumed": 0, "train_time_s": 0.1}
    cfg = yaml.safe_load((final / "config.yaml").read_text())
    assert cfg == {"experiment": "fam/probe", "recipe": "probe", "profile": "smoke", "overrides": ["value=3"],
                   "params": {"seed": 42, "tracking": None, "value": 3.0, "outcome": "ok"}}
    assert not list(final.parent.glob("*.partial"))
    assert "run fam/probe/" in (final / "run.log").read_text()


def test_manifest_records_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREPRO_IMAGE", "llmrepro:0.1.0-cpu+abc1234")
    final = runs.execute(spec(value=3.0), tmp_path)
    m = manifest(final)
    assert m["status"] == "complete" and m["experiment"] == "fam/probe" and m["recipe"] == "probe"
    assert m["config_hash"] == spec(value=3.0, seed=42, tracking=None, outcome="ok").config_hash
    assert m["run_id"] == final.name and m["seeds"] == {"seed": 42} and m["profile"] == "smoke"
    assert m["container_image"] == "llmrepro:0.1.0-cpu+abc1234"
    assert m["packages"]["torch"] == torch.__version__ and m["packages"]["transformers"] == transformers.__version__
    assert set(m["packages"]) >= {"peft", "trl", "datasets", "bitsandbytes", "traker", "wandb"}
    assert m["hardware"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {"torch_cuda", "cudnn", "gpus", "driver"} <= set(m["hardware"])
    assert len(m["git"]["commit"]) == 40 and isinstance(m["git"]["dirty"], bool)
    assert m["inputs"] == {"datasets": [{"name": "probe-data", "sha256": "0" * 64}]}
    assert m["metrics"] == {"value": 6.0, "resumed": 0, "train_time_s": 0.1}
    assert m["started"] <= m["finished"] and m["duration_s"] >= 0 and m["attempts"] == 1


def test_finished_run_is_never_overwritten_without_force(tmp_path):
    final = runs.execute(spec(value=3.0), tmp_path)
    (final / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="a finished run already exists at .*; pass --force to replace it"):
        runs.execute(spec(value=3.0), tmp_path)
    assert (final / "notes.txt").read_text() == "mine"
    again = runs.execute(spec(value=3.0), tmp_path, force=True)
    assert again == final and not (final / "notes.txt").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the replaced run is gone, no leftovers


@pytest.mark.parametrize("outcome, status, error", [("crash", "failed", RuntimeError),
                                                    ("interrupt", "interrupted", KeyboardInterrupt)])
def test_failed_run_stays_partial_and_marked(tmp_path, outcome, status, error):
    with pytest.raises(error):
        runs.execute(spec(value=3.0, outcome=outcome), tmp_path)
    exp_dir = tmp_path / "fam" / "probe"
    (partial,) = exp_dir.iterdir()
    assert partial.name.endswith(".partial")
    m = manifest(partial)
    assert m["status"] == status and "finished" in m
    assert not (partial / "metrics.json").exists()
    with pytest.raises(UserError, match="an incomplete run exists at .*pass --resume to continue it or --force"):
        runs.execute(spec(value=3.0, outcome=outcome), tmp_path)


def test_resume_continues_the_partial_run(tmp_path):
    with pytest.raises(RuntimeError):
        runs.execute(spec(value=3.0, outcome="crash"), tmp_path, run_id="r1")
    final = runs.execute(spec(value=3.0, outcome="ok"), tmp_path, run_id="r1", resume=True)
    assert json.loads((final / "metrics.json").read_text())["resumed"] == 1
    m = manifest(final)
    assert m["status"] == "complete" and m["resumed_from"] == "failed" and m["attempts"] == 2


def test_bad_input_leaves_nothing_behind(tmp_path):
    out = tmp_path / "outputs"
    with pytest.raises(UserError, match="probe: bad input"):
        runs.execute(spec(value=3.0, outcome="bad-input"), out)
    assert not out.exists()
    (out / "fam").mkdir(parents=True)
    with pytest.raises(UserError):
        runs.execute(spec(value=3.0, outcome="bad-input"), out)
    assert [p.name for p in out.iterdir()] == ["fam"] and not any((out / "fam").iterdir())


def test_invalid_params_fail_before_any_directory_exists(tmp_path):
    with pytest.raises(UserError, match=r"params.value: Input should be a valid number"):
        runs.execute(spec(value="x"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREPRO_OUTPUT_DIR", str(tmp_path / "mounted"))
    final = runs.execute(spec(value=1.0))
    assert final.parent.parent.parent == tmp_path / "mounted"


def test_compare_metrics_ignores_timings():
    rows = runs.compare_metrics({"loss": 1.0, "train_time_s": 3.0, "n": 4}, {"loss": 1.0 + 1e-9, "train_time_s": 9.0, "n": 5},
                                rtol=1e-6, atol=0)
    assert rows == [("loss", 1.0, 1.0 + 1e-9, True), ("n", 4, 5, False), ("train_time_s", 3.0, 9.0, True)]


def test_json_outputs_are_standard_json(tmp_path):
    runs.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_wandb_tracking_offline_is_recorded(tmp_path, monkeypatch):
    """`tracking: wandb` with WANDB_MODE=offline: a real offline wandb run under the run dir, its id in the manifest."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = runs.execute(runs.RunSpec("fam/probe", "probe", {"value": 2.0, "tracking": "wandb"}), tmp_path)
    tracking = manifest(final)["tracking"]
    assert tracking["backend"] == "wandb" and tracking["mode"] == "offline" and tracking["project"] == "llmrepro"
    (offline_run,) = (final / "wandb").glob("offline-run-*")
    assert offline_run.name.endswith(tracking["run_id"])


def test_tracking_is_off_by_default(tmp_path):
    assert manifest(runs.execute(spec(value=1.0), tmp_path))["tracking"] is None
