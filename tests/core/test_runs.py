"""Run directories: atomic publish, failure marking, resume, no silent overwrite, manifest contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from probe_recipe import Config, registered

from llmrepro.core import config, io, results, runs
from llmrepro.core.catalog import RunSpec
from llmrepro.core.errors import UserError


@pytest.fixture(autouse=True)
def probe():
    with registered():
        yield


def spec(**params) -> RunSpec:
    return RunSpec("fam/probe", "probe", Config(**params), profile="smoke", overrides=["value=3"])


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_successful_run_layout(tmp_path):
    final = runs.execute(spec(value=3.0), tmp_path)
    full = spec(value=3.0)  # the id hashes the validated params
    assert final == tmp_path / "fam" / "probe" / full.default_run_id
    assert final.name.startswith("smoke-") and len(final.name) == len("smoke-") + 10
    assert sorted(p.name for p in final.iterdir()) == ["artifact.txt", "config.yaml", "manifest.json",
                                                       "metrics.json", "run.log"]
    assert json.loads((final / "metrics.json").read_text()) == {"value": 6.0, "resumed": 0, "train_time_s": 0.1}
    cfg = yaml.safe_load((final / "config.yaml").read_text())
    assert cfg == {"experiment": "fam/probe", "recipe": "probe", "profile": "smoke", "overrides": ["value=3"],
                   "params": {"seed": 42, "tracking": None, "value": 3.0, "outcome": "ok", "sleep_s": 0.0,
                              "reads": None}}
    assert not list(final.parent.glob("*.partial"))
    assert "run fam/probe/" in (final / "run.log").read_text()


def test_manifest_records_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREPRO_IMAGE", "llmrepro:0.1.0-cpu+abc1234")
    final = runs.execute(spec(value=3.0), tmp_path)
    m = manifest(final)
    assert m["status"] == "complete" and m["experiment"] == "fam/probe" and m["recipe"] == "probe"
    assert m["config_hash"] == spec(value=3.0).config_hash == config.config_hash("probe", spec(value=3.0).params)
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
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the replaced run and the lock are gone


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


def test_output_dir_that_is_a_file_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=r"output directory .*/file exists and is not a directory"):
        runs.execute(spec(value=3.0), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_output_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREPRO_OUTPUT_DIR", str(tmp_path / "mounted"))
    final = runs.execute(spec(value=1.0))
    assert final.parent.parent.parent == tmp_path / "mounted"


def test_compare_metrics_ignores_timings():
    rows = results.compare_metrics({"loss": 1.0, "train_time_s": 3.0, "n": 4}, {"loss": 1.0 + 1e-9, "train_time_s": 9.0, "n": 5},
                                rtol=1e-6, atol=0)
    assert rows == [("loss", 1.0, 1.0 + 1e-9, True), ("n", 4, 5, False), ("train_time_s", 3.0, 9.0, True)]


def test_json_outputs_are_standard_json(tmp_path):
    io.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_wandb_tracking_offline_is_recorded(tmp_path, monkeypatch):
    """`tracking: wandb` with WANDB_MODE=offline: a real offline wandb run under the run dir, its id in the manifest."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = runs.execute(RunSpec("fam/probe", "probe", Config(value=2.0, tracking="wandb")), tmp_path)
    tracking = manifest(final)["tracking"]
    assert tracking["backend"] == "wandb" and tracking["mode"] == "offline" and tracking["project"] == "llmrepro"
    (offline_run,) = (final / "wandb").glob("offline-run-*")
    assert offline_run.name.endswith(tracking["run_id"])


def test_tracking_is_off_by_default(tmp_path):
    assert manifest(runs.execute(spec(value=1.0), tmp_path))["tracking"] is None


# ------------------------------------------------------------------------------------------ the run lock


def test_a_second_process_on_the_same_run_is_refused_naming_the_first(tmp_path):
    """Two real `llmrepro run` processes of one experiment: one finished run, one clear refusal."""
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "llmrepro.cli", "run", "memory_efficiency/small-net-timing", "--profile", "smoke",
            "--output-dir", str(tmp_path), "iterations=4000", "repeat=2"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    exp_dir = tmp_path / "memory_efficiency" / "small-net-timing"
    deadline = time.time() + 120
    while not list(exp_dir.glob("*.partial")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    second = subprocess.run(args, capture_output=True, text=True)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1
    assert f"is in use by pid {first.pid} on " in second.stderr and "(or pass --wait)" in second.stderr
    assert [p.name for p in exp_dir.iterdir()] == [Path(out.strip()).name]  # one finished run, no lock left


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    exp_dir = tmp_path / "fam" / "probe"
    exp_dir.mkdir(parents=True)
    run_id = spec(value=3.0).default_run_id
    # what a killed holder leaves: its record in the lock file, and no flock (the kernel dropped it)
    (exp_dir / f".{run_id}.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00+00:00"}))
    final = runs.execute(spec(value=3.0), tmp_path)
    assert final.is_dir() and not (exp_dir / f".{run_id}.lock").exists()
    assert "took over the lock of run" in caplog.text and "pid 999999 on gone" in caplog.text


def test_wait_blocks_until_the_holder_is_done(tmp_path):
    import threading

    holder = threading.Thread(target=runs.execute, args=(spec(value=3.0, sleep_s=1.5), tmp_path))
    holder.start()
    partial = tmp_path / "fam" / "probe" / f"{spec(value=3.0, sleep_s=1.5).default_run_id}.partial"
    while not (partial / "started").exists():
        pass
    with pytest.raises(UserError, match="is in use by pid"):
        runs.execute(spec(value=3.0, sleep_s=1.5), tmp_path)
    with pytest.raises(UserError, match="a finished run already exists"):  # waited, then found it finished
        runs.execute(spec(value=3.0, sleep_s=1.5), tmp_path, wait=True)
    holder.join()


# ------------------------------------------------------------------------------------------ runs that read runs


def test_a_run_reads_another_and_records_it(tmp_path):
    first = runs.execute(spec(value=3.0), tmp_path, run_id="first")
    second = runs.execute(spec(value=1.0, reads={"run_dir": str(first)}), tmp_path, run_id="second")
    assert json.loads((second / "metrics.json").read_text())["value"] == 2 * (1.0 + 3.0)
    (dep,) = manifest(second)["depends_on"]
    assert dep == {"experiment": "fam/probe", "recipe": "probe", "run_id": "first",
                   "config_hash": manifest(first)["config_hash"], "path": str(first)}


def test_missing_unfinished_and_wrong_runs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^needs .*/nowhere: no finished run at .*/nowhere$"):
        runs.execute(spec(reads={"run_dir": str(tmp_path / "nowhere")}), tmp_path, run_id="a")
    with pytest.raises(RuntimeError):
        runs.execute(spec(outcome="crash"), tmp_path, run_id="crashed")
    crashed = tmp_path / "fam" / "probe" / "crashed"
    with pytest.raises(UserError, match=r"the run at .*crashed.partial is unfinished \(status failed\); finish it"):
        runs.execute(spec(reads={"run_dir": str(crashed)}), tmp_path, run_id="b")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"status": "complete", "experiment": "x/y", "run_id": "r",
                                                     "config_hash": "0"}))
    (other / "config.yaml").write_text(yaml.safe_dump({"recipe": "instruct-sft", "params": {}}))
    with pytest.raises(UserError, match=r"other is a run of recipe instruct-sft, not probe$"):
        runs.execute(spec(reads={"run_dir": str(other)}), tmp_path, run_id="c")
    assert sorted(p.name for p in (tmp_path / "fam" / "probe").iterdir()) == ["crashed.partial"]


def test_context_builds_on_its_own(tmp_path):
    from llmrepro.core.context import RunContext

    ctx = RunContext(dir=tmp_path / "fam" / "exp" / "run")
    assert ctx.output_root == tmp_path and ctx.experiment == "test/run" and not ctx.tracking
    ctx.record_input("datasets", "d", sha256="1")
    ctx.record_input("datasets", "d", sha256="1")
    assert ctx.manifest["inputs"] == {"datasets": [{"name": "d", "sha256": "1"}]}
