"""The gradient-projection experiments: each YAML header names the source files and commit and lists what the
source did and the deliberate differences; the recipes' docstrings list theirs; every `reference:` metric is one
the experiment's recipe produces; the grid is the notebook's."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from llmrepro.core import catalog
from llmrepro.recipes import extract_gradients, projection_quality, score_gradients

FAMILY = catalog.experiments_dir() / "gradients"
SOURCE = catalog.SOURCES["gradient-projection"]
SOURCE_FILES = {"extract_gradients.py", "olmo_training_utils.py", "util.py", "explain.py", "DAP_main_results.ipynb",
                "extract_grads.sbatch", "exp.sbatch", "README.md"}
EXPERIMENTS = sorted(p.stem for p in FAMILY.glob("*.yaml"))
GOLDEN = catalog.experiments_dir().parent / "tests" / "golden" / "gradients"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_names_the_source_file_and_commit(name):
    text = (FAMILY / f"{name}.yaml").read_text()
    header = text[:text.index("\nrecipe:")]
    assert header.splitlines()[0] == f"# llmrepro run gradients/{name}"
    source = re.search(r"^# Source: (\S+) @ (\w+), (.+)$", header, re.M)
    assert source and (source[1], source[2]) == (SOURCE.repository, SOURCE.commit)
    named = set(re.findall(r"[\w.]+\.(?:py|ipynb|sbatch|md)", header))
    assert named and named <= SOURCE_FILES, named - SOURCE_FILES
    assert "# What the source did:" in header and "# Deliberate differences" in header
    assert yaml.safe_load(text)["source"] == "gradient-projection"


@pytest.mark.parametrize("module", [extract_gradients, score_gradients, projection_quality])
def test_recipe_docstrings_list_their_differences(module):
    assert "Deliberate differences from the source" in module.__doc__ and SOURCE.commit in module.__doc__


def smoke_to_real_dims() -> dict[int, int]:
    """Each projected extraction's smoke dimension -> its real one (one mapping for the whole grid)."""
    out = {}
    for name in EXPERIMENTS:
        spec = yaml.safe_load((FAMILY / f"{name}.yaml").read_text())
        if spec["recipe"] == "extract-gradients" and spec["params"].get("projection"):
            smoke, real = spec["profiles"]["smoke"]["projection"]["dim"], spec["params"]["projection"]["dim"]
            assert out.setdefault(smoke, real) == real
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_references_name_metrics_the_recipe_produces(name):
    """The smoke run's metric names (tests/golden), with the smoke dimensions read as the real ones, hold every
    published figure's metric."""
    spec = yaml.safe_load((FAMILY / f"{name}.yaml").read_text())
    golden = set(json.loads((GOLDEN / f"{name}.json").read_text())["metrics"])
    dims = smoke_to_real_dims()
    produced = {"_".join(str(dims.get(int(t), t)) if t.isdigit() else t for t in m.split("_")) for m in golden}
    produced |= {"extract_time_s", "samples_per_s", "peak_memory_mb"} if spec["recipe"] == "extract-gradients" else set()
    missing = {r["metric"] for r in spec.get("reference", [])} - produced
    assert not missing, sorted(missing)


def test_the_grid_is_the_notebook_s():
    """16 projected extractions ({normal, rademacher} x {2,048,000, 204,800, 16,384, 8,192} x {train, test}), each
    pair read by projection-quality, and the same grid projected here by the -reprojected variant."""
    grid = {(t, d, side) for t in ("normal", "rademacher") for d in (2048000, 204800, 16384, 8192)
            for side in ("train", "test")}
    found = set()
    for name in EXPERIMENTS:
        spec = yaml.safe_load((FAMILY / f"{name}.yaml").read_text())
        if spec["recipe"] == "extract-gradients" and (p := spec["params"].get("projection")):
            assert (p["projector"], p["seed"], p["max_batch_size"]) == ("cuda", 42, 8)
            found.add((p["type"], p["dim"], "train" if spec["params"]["data"]["split"] == "train" else "test"))
    assert found == grid
    quality = yaml.safe_load((FAMILY / "projection-quality-olmo2-7b-sft.yaml").read_text())["params"]
    assert len(quality["projected"]) == 8 and quality["exclude_ids"] == ["open_orca_t0.1598436"]
    assert (quality["functions"], quality["ranking"], quality["permutations"], quality["permutation_seed"]) == (
        ["dot", "cosine"], "source", 1000, 42)
    again = yaml.safe_load((FAMILY / "projection-quality-olmo2-7b-sft-reprojected.yaml").read_text())["params"]
    assert {(p["type"], p["dim"]) for p in again["projections"]} == {(t, d) for t, d, _ in grid}
