"""Every smoke profile's non-volatile metrics, pinned: the whole catalog runs once per session, dependencies
first, and each experiment is compared with tests/golden/<experiment>.json.

A deliberate change regenerates the files: `python -m llmrepro.devtools golden [--only GLOB]`.
"""

from __future__ import annotations

import json

import pytest

from llmrepro import devtools
from llmrepro.core import catalog

NAMES = catalog.names()


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Every smoke profile's run in one output root, made when a test first asks (dependencies first)."""
    return devtools.SmokeRuns(tmp_path_factory.mktemp("smoke-outputs"))


@pytest.mark.parametrize("name", NAMES)
def test_smoke_metrics_match_their_golden_file(smoke_runs, name):
    result = smoke_runs.get(name)
    path = devtools.golden_path(name)
    assert path.is_file(), f"no golden file for {name}: run `python -m llmrepro.devtools golden --only {name}`"
    golden = json.loads(path.read_text())
    actual = devtools.pinned(json.loads((result / "metrics.json").read_text()))
    assert golden["metrics"], f"{name} pins no metric"
    assert not devtools.mismatches(golden["metrics"], actual), (
        f"{name} differs from {path.name} (regenerate with `python -m llmrepro.devtools golden --only {name}` "
        "if the change is deliberate): " + "; ".join(devtools.mismatches(golden["metrics"], actual)))


def test_every_golden_file_belongs_to_an_experiment():
    files = {str(p.relative_to(devtools.GOLDEN_DIR).with_suffix("")) for p in devtools.GOLDEN_DIR.rglob("*.json")}
    assert files == set(NAMES)


def test_mismatches_names_what_differs():
    assert devtools.mismatches({"a": 1.0, "b": 2}, {"a": 1.0 + 1e-7, "b": 2}) == []
    assert devtools.mismatches({"a": 1.0, "b": 2, "c": 3}, {"a": 1.1, "b": 2, "d": 4}) == [
        "a: golden 1.0, got 1.1", "c: missing (golden 3)", "d: new metric 4 (not in the golden file)"]
    assert devtools.pinned({"loss": 1.0, "step_time_s": 2.0, "peak_memory_mb": 3.0, "reference": {}}) == {"loss": 1.0}
