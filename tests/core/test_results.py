"""Published figures next to measured ones: the `reference` block of metrics.json, `llmrepro compare` in its
four formats, and `llmrepro reproduce` finding a metric that changed."""

from __future__ import annotations

import json

import pytest
from probe_recipe import Config, registered

from llmrepro.core import results, runs
from llmrepro.core.catalog import Reference, RunSpec

REFS = [Reference(metric="value", value=5.5, where="Table 1 of the paper", tolerance=1.0),
        Reference(metric="missing_metric", value=1.0, where="Fig. 2")]


@pytest.fixture(autouse=True)
def probe():
    with registered():
        yield


def two_runs(tmp_path):
    a = runs.execute(RunSpec("fam/probe", "probe", Config(value=3.0), references=REFS), tmp_path, run_id="a")
    b = runs.execute(RunSpec("fam/probe", "probe", Config(value=1.0), references=REFS), tmp_path, run_id="b")
    return a, b


def test_metrics_carry_measured_next_to_published(tmp_path):
    a, b = two_runs(tmp_path)
    ref = json.loads((a / "metrics.json").read_text())["reference"]
    assert ref == {
        "value": {"measured": 6.0, "published": 5.5, "diff": 0.5, "tolerance": 1.0, "match": True,
                  "where": "Table 1 of the paper"},
        "missing_metric": {"measured": None, "published": 1.0, "diff": None, "tolerance": None, "match": None,
                           "where": "Fig. 2"}}
    assert json.loads((b / "metrics.json").read_text())["reference"]["value"]["match"] is False  # 2.0 vs 5.5


def test_compare_formats(tmp_path, cli):
    a, b = two_runs(tmp_path)
    code, out, _ = cli("compare", str(a), str(b / "manifest.json"), "--metric", "value", "--format", "csv")
    assert code == 0
    assert out.splitlines() == [
        "experiment,run,profile,metric,measured,published,diff,published in",
        "fam/probe,a,default,value,6,5.5,0.5,Table 1 of the paper",
        "fam/probe,b,default,value,2,5.5,-3.5,Table 1 of the paper"]
    code, out, _ = cli("compare", str(a), "--metric", "val*", "--format", "markdown")
    assert out.splitlines()[:3] == ["| experiment | run | profile | metric | measured | published | diff | published in |",
                                    "|---|---|---|---|---|---|---|---|",
                                    "| fam/probe | a | default | value | 6 | 5.5 | 0.5 | Table 1 of the paper |"]
    code, out, _ = cli("compare", str(a), str(b), "--references-only", "--format", "json")
    assert [(r["run"], r["metric"], r["diff"]) for r in json.loads(out)] == [("a", "value", 0.5), ("b", "value", -3.5)]
    code, out, _ = cli("compare", str(a))
    lines = out.splitlines()
    assert lines[0].split() == ["experiment", "run", "profile", "metric", "measured", "published", "diff", "published",
                                "in"]
    assert [line.split()[3] for line in lines[2:]] == ["value", "resumed", "train_time_s"]


def test_compare_shows_confidence_intervals_as_one_column(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"experiment": "x/y", "run_id": "r", "profile": "smoke"}))
    (run / "metrics.json").write_text(json.dumps({"score": 0.5, "score_ci_low": 0.4, "score_ci_high": 0.6, "n": 3}))
    rows, header = results.compare([str(run)])
    assert header == ["experiment", "run", "profile", "metric", "measured", "95% CI", "published", "diff",
                      "published in"]
    assert rows == [["x/y", "r", "smoke", "score", 0.5, "[0.4, 0.6]", None, None, None],
                    ["x/y", "r", "smoke", "n", 3, None, None, None, None]]


def test_compare_bad_input_is_one_line(tmp_path, cli):
    code, _, err = cli("compare", str(tmp_path))
    assert code == 2 and err == f"llmrepro: error: {tmp_path}: not a finished run (needs manifest.json and metrics.json)\n"
    a, _ = two_runs(tmp_path / "o")
    code, _, err = cli("compare", str(a), "--metric", "nope*")
    assert code == 2 and err == "llmrepro: error: compare: no metric matches nope*\n"


def test_reproduce_reports_a_changed_metric(tmp_path, cli):
    a, _ = two_runs(tmp_path)
    code, out, _ = cli("reproduce", str(a / "manifest.json"), "--output-dir", str(tmp_path))
    assert code == 0 and out.splitlines()[-1].startswith("reproduce: 3 passed, 0 failed")
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["metrics"]["value"] = 7.0  # as if the original run had measured something else
    (a / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = cli("reproduce", str(a), "--output-dir", str(tmp_path), "--force")
    assert code == 1
    assert [line.split() for line in out.splitlines() if line.startswith("value")] == [["value", "7", "6", "DIFFERS"]]
    assert out.splitlines()[-1].startswith("reproduce: 2 passed, 1 failed")
