"""Every fixture through the real loader, with the real datasets' columns; malformed input named precisely."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llmrepro.core.errors import UserError
from llmrepro.lm import fixtures
from llmrepro.lm.data import FORMATS, DataConfig, load_rows, to_instruction

# fixture -> (format, exact columns of the real dataset)
EXPECTED = {
    "dolly": ("dolly", ["instruction", "context", "response", "category"]),
    "alpaca": ("alpaca", ["instruction", "input", "output", "text"]),
    "alpaca-cleaned": ("alpaca", ["instruction", "input", "output"]),
    "hc3": ("hc3", ["id", "question", "human_answers", "chatgpt_answers", "source"]),
    "evol-instruct": ("evol-instruct", ["instruction", "output"]),
    "lima": ("chat", ["dataset", "id", "messages"]),
    "tulu-v2": ("chat", ["dataset", "id", "messages"]),
    "lima-paraphrased": ("paraphrased", ["id", "paraphrased_messages"]),
    "lima-model-generated": ("model-generated", ["id", "model_generated_messages"]),
    "sampled-tulu": ("chat", ["dataset", "id", "messages"]),
    "ultrachat-test": ("chat", ["prompt", "prompt_id", "messages"]),
    "helpsteer2-dpo": ("preference", ["prompt", "chosen", "rejected"]),
    "helpsteer2-dpo-pairs": ("helpsteer2-dpo", ["prompt", "chosen_response", "rejected_response"]),
    "helpsteer2-dpo-validation": ("helpsteer2-dpo", ["prompt", "chosen_response", "rejected_response"]),
    "dpo-helpsteer": ("dpo-helpsteer", ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
                                        "score_rejected"]),
    "truthful-qa-binary": ("binary-choice", ["question", "choices", "label"]),
    "toxic-dpo": ("preference", ["prompt", "chosen", "rejected"]),
    "truthfulqa-mc": ("multiple-choice", ["question", "mc1_targets", "mc2_targets"]),
    "cities": ("true-false", ["statement", "label", "city", "country", "correct_country"]),
    "neg_cities": ("true-false", ["statement", "label", "city", "country", "correct_country"]),
    "larger_than": ("true-false", ["statement", "label", "n1", "n2", "diff", "abs_diff"]),
    "smaller_than": ("true-false", ["statement", "label", "n1", "n2", "diff", "abs_diff"]),
    "sp_en_trans": ("true-false", ["statement", "label"]),
    "neg_sp_en_trans": ("true-false", ["statement", "label"]),
    "companies_true_false": ("true-false", ["statement", "label"]),
    "common_claim_true_false": ("true-false", ["statement", "label"]),
    "gair-lima": ("lima", ["conversations", "source"]),
    "counterfact_true_false": ("true-false", ["statement", "label", "relation", "subject", "target", "true_target"]),
}
# fixtures read by other readers than load_rows: the reader and the exact columns it gets
OTHER_READERS = {
    "plain-text": ("lm.mc.read_texts", ["text"]),
    "truthfulqa-csv": ("representations.datasets.read_csv", ["Type", "Category", "Question", "Best Answer",
                                                            "Correct Answers", "Incorrect Answers", "Source"]),
    "politicians": ("representations.datasets.read_csv", ["", "index", "Unnamed: 0", "name", "nameLabel", "education",
                                                          "educationLabel", "countryLabel", "isTrue", "Questions",
                                                          "Statements", "Group"]),
}
GEOMETRY_OF_TRUTH = Path(__file__).resolve().parents[3] / "shared" / "data" / "geometry-of-truth"


def test_every_fixture_is_covered():
    assert set(EXPECTED) | set(OTHER_READERS) == set(fixtures.FIXTURES)
    assert not set(EXPECTED) & set(OTHER_READERS)
    assert {fmt for fmt, _ in EXPECTED.values()} == set(FORMATS)


def test_plain_text_fixture_through_its_reader():
    from llmrepro.lm import mc

    texts = mc.read_texts(mc.TextData(name="fixture:plain-text", limit=100))
    rows = fixtures.rows("plain-text")
    assert texts == [r["text"] for r in rows] and len(set(texts)) == len(texts) >= 8
    assert OTHER_READERS["plain-text"][1] == list(rows[0])


@pytest.mark.parametrize("name", ["truthfulqa-csv", "politicians"])
def test_csv_fixtures_through_their_reader(name):
    """Written with the real file's quirks (TruthfulQA.csv's byte-order mark, the Politicians set's unnamed index
    columns) and read back by the truth datasets' reader with exactly the real columns."""
    from llmrepro.representations.datasets import read_csv

    path = fixtures.path(name)
    if name == "truthfulqa-csv":
        assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    rows = read_csv(path)
    assert len(rows) >= 8 and all(list(r) == OTHER_READERS[name][1] for r in rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_through_real_loader(name):
    fmt, columns = EXPECTED[name]
    rows = load_rows(DataConfig(name=f"fixture:{name}", format=fmt))
    assert len(rows) >= 8
    assert all(list(row) == columns for row in rows)


def test_fixture_values():
    mc = load_rows(DataConfig(name="fixture:truthfulqa-mc", format="multiple-choice"))[0]
    assert mc["mc1_targets"]["labels"] == [1, 0, 0] and len(mc["mc1_targets"]["choices"]) == 3
    assert sum(mc["mc2_targets"]["labels"]) == 2
    cities = load_rows(DataConfig(name="fixture:cities", format="true-false"))[:2]
    assert cities[0] == {"statement": "The city of Paris is in France.", "label": 1, "city": "Paris",
                         "country": "France", "correct_country": "France"}
    assert cities[1]["label"] == 0 and cities[1]["correct_country"] == "France"
    larger = load_rows(DataConfig(name="fixture:larger_than", format="true-false"))[0]
    assert larger == {"statement": "Fifty-one is larger than fifty-two.", "label": 0, "n1": 51, "n2": 52,
                      "diff": -1, "abs_diff": 1}
    lima = load_rows(DataConfig(name="fixture:lima", format="chat"))
    assert lima[0]["messages"][0]["role"] == "user" and lima[0]["id"] == "lima_0"


@pytest.mark.skipif(not GEOMETRY_OF_TRUTH.is_dir(), reason="real geometry-of-truth copies not present")
@pytest.mark.parametrize("name", ["cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans",
                                  "neg_sp_en_trans", "companies_true_false", "common_claim_true_false"])
def test_real_geometry_of_truth_reads_unchanged(name):
    """The real files load with exactly the columns our fixtures have (the fixtures mirror them)."""
    path = GEOMETRY_OF_TRUTH / f"{name}.csv"
    rows = load_rows(DataConfig(name=str(path), format="true-false"))
    with open(path, newline="") as f:
        reference = list(csv.DictReader(f))
    assert len(rows) == len(reference) and list(rows[0]) == EXPECTED[name][1]
    assert [r["statement"] for r in rows] == [r["statement"] for r in reference]
    assert [r["label"] for r in rows] == [int(r["label"]) for r in reference]


def test_limit_and_provenance(tmp_path):
    from llmrepro.core.context import RunContext
    from llmrepro.core.io import sha256_file

    ctx = RunContext(dir=tmp_path / "fam" / "exp" / "run")
    rows = load_rows(DataConfig(name="fixture:dolly", format="dolly", limit=5), ctx)
    assert rows == fixtures.rows("dolly")[:5]
    assert ctx.manifest["inputs"] == {"datasets": [{"name": "fixture:dolly", "source": "fixture", "split": "train",
                                                    "sha256": sha256_file(fixtures.path("dolly")), "rows": 5}]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_malformed_rows_name_row_and_column(tmp_path):
    good = {"instruction": "a", "context": "", "response": "b", "category": "open_qa"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, good, {k: v for k, v in good.items() if k != "response"}])
    with pytest.raises(UserError, match=r"d.jsonl: row 2, column 'response': missing value$"):
        load_rows(DataConfig(name=path, format="dolly"))
    (tmp_path / "c.csv").write_text("statement,truth\nx,1\n")
    with pytest.raises(UserError, match=r"c.csv: row 0: missing column 'label' \(format true-false needs statement, label\)"):
        load_rows(DataConfig(name=str(tmp_path / "c.csv"), format="true-false"))
    path = _write_jsonl(tmp_path / "e.jsonl", [{"statement": "x", "label": "yes"}])
    with pytest.raises(UserError, match=r"row 0, column 'label': expected int, got str 'yes'"):
        load_rows(DataConfig(name=path, format="true-false"))


def test_missing_or_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="dataset file not found: /nope/data.jsonl"):
        load_rows(DataConfig(name="/nope/data.jsonl", format="dolly"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported extension"):
        load_rows(DataConfig(name=str(tmp_path / "x.txt"), format="dolly"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl: cannot parse"):
        load_rows(DataConfig(name=str(tmp_path / "bad.jsonl"), format="dolly"))
    with pytest.raises(UserError, match="unknown fixture 'nope'"):
        load_rows(DataConfig(name="fixture:nope", format="dolly"))
    with pytest.raises(UserError, match="dataset 'nobody/no-such-dataset' not found"):
        load_rows(DataConfig(name="nobody/no-such-dataset", format="dolly"))


def test_instruction_normalisation():
    assert to_instruction({"instruction": "i", "input": "x", "output": "o"}, "alpaca") == \
        {"instruction": "i", "input": "x", "response": "o", "category": None}
    hc3 = {"question": "q", "human_answers": ["h"], "chatgpt_answers": ["c"]}
    assert to_instruction(hc3, "hc3")["response"] == "h" and to_instruction(hc3, "hc3", "chatgpt")["response"] == "c"
    assert to_instruction({"instruction": "i", "output": "o"}, "evol-instruct")["response"] == "o"
