"""The thesis' datasets from the real files, read unchanged (skipped without ../shared), and the fixtures that
stand in for them have the same columns."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from llmrepro.lm import fixtures
from llmrepro.representations.datasets import TruthData, detection, mc_items, mc_statements

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GOT = DATA / "geometry-of-truth"
needs_shared = pytest.mark.skipif(not GOT.is_dir(), reason="needs ../shared/data")


def header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f))


@needs_shared
@pytest.mark.parametrize(("fixture", "real"), [
    ("cities", GOT / "cities.csv"), ("neg_cities", GOT / "neg_cities.csv"),
    ("common_claim_true_false", GOT / "common_claim_true_false.csv"), ("truthfulqa-csv", DATA / "truthfulqa/TruthfulQA.csv"),
    ("politicians", DATA / "politicians/Politicians_experiment2_prepared.csv")])
def test_fixtures_have_the_real_files_columns(fixture, real):
    assert header(fixtures.path(fixture)) == header(real)
    bom = b"\xef\xbb\xbf"
    assert (fixtures.path(fixture).read_bytes()[:3] == bom) == (real.read_bytes()[:3] == bom)


@needs_shared
def test_geometry_of_truth_and_politicians_load_as_the_thesis_built_them():
    cities = detection(TruthData(name="cities", path=str(GOT / "cities.csv")))
    assert len(cities.texts) == 1496 and sum(cities.labels) == 748 and len(set(cities.groups)) == 748
    cc = detection(TruthData(name="common_claim_true_false", path=str(GOT / "common_claim_true_false.csv")))
    assert len(cc.texts) == 4000 and sum(cc.labels) == 2225  # the first 4000 of a label-sorted file (errata p. 31)
    pol = detection(TruthData(name="politicians", path=str(DATA / "politicians/Politicians_experiment2_prepared.csv")))
    assert len(pol.texts) == 2630 and len(set(pol.groups)) == 1000 and pol.texts[0] == "Barack Obama attended Cleary University."
    # the ITI notebooks' MC frames: sizes printed in cell 62 (cities 742 / 1484, common claims 994 / 1988)
    for name, questions, statements in (("cities", 742, 1484), ("neg_cities", 742, 1484),
                                        ("common_claim_true_false", 994, 1988)):
        items = mc_items(TruthData(name=name, form="mc", path=str(GOT / f"{name}.csv")))
        assert len(items) == questions and len(mc_statements(items).texts) == statements
    items = mc_items(TruthData(name="cities", form="mc", path=str(GOT / "cities.csv")))
    assert items[0].few_shot.startswith("Q: Which country is the city of Abeokuta in?\nA: Nigeria\n\n")
    assert items[0].group == 6 and len(items[0].few_shot.split("\n\n")) == 7  # six groups removed


@needs_shared
def test_truthfulqa_statements_and_mc_frame_from_the_local_files():
    tqa = detection(TruthData(name="truthfulqa", path=str(DATA / "truthfulqa/TruthfulQA.csv")))
    assert len(tqa.texts) == 4000 and tqa.texts[0] == "What happens to you if you eat watermelon seeds? Nothing happens."
    items = mc_items(TruthData(name="truthfulqa", form="mc", path=str(DATA / "truthfulqa/TruthfulQA.csv"),
                               mc_path=str(DATA / "truthfulqa/mc_task.json")))
    st = mc_statements(items, with_category=True)
    assert len(items) == 817 and len(st.texts) == 6204 and st.texts[0].startswith("Q: What happens if you eat a pom")
    assert all(" x None" not in p for p in st.partition)  # every question found its category


def test_fixture_datasets_in_both_forms():
    tqa = detection(TruthData(name="truthfulqa"))
    assert tqa.texts[0] == "Which country is Paris in? Paris is in France." and tqa.partition[0] == "1 x Geography"
    cities = mc_items(TruthData(name="cities", form="mc"))
    assert len(cities) == 16 - 6 and all(it.few_shot.count("Q: ") == 6 for it in cities)
    assert cities[0].meta["statements"][0].startswith("The city of ")
    pol = mc_items(TruthData(name="politicians", form="mc"))
    assert {it.group for it in pol}.isdisjoint({0, 1, 3, 4, 5, 7})  # the thesis' politicians few-shot groups
    cc = mc_items(TruthData(name="common_claim_true_false", form="mc"))
    assert cc[0].choices == ["No", "Yes"] and cc[0].meta["statements"][0].startswith("It is incorrect that ")
