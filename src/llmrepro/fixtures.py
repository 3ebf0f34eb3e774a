"""Tiny fixture datasets with the real datasets' columns, generated deterministically from a small fact table.

`fixture:<name>` in a data config resolves to one of these files (written to the cache on first use) and is
then read by the same loader as any local file. The facts are simple and repetitive on purpose: a tiny
model learns them within a few dozen steps, so smoke runs show a falling loss.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

FIXTURES_VERSION = 1

CAPITALS = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
            ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Oslo", "Norway"), ("Dublin", "Ireland"),
            ("Athens", "Greece"), ("Warsaw", "Poland"), ("Prague", "Czechia"), ("Helsinki", "Finland"),
            ("Cairo", "Egypt"), ("Tokyo", "Japan"), ("Lima", "Peru"), ("Ottawa", "Canada")]
NUMBERS = ["fifty-one", "fifty-two", "fifty-three", "fifty-four", "fifty-five", "fifty-six", "fifty-seven"]
SPANISH = [("uno", "one"), ("dos", "two"), ("casa", "house"), ("perro", "dog"), ("gato", "cat"),
           ("agua", "water"), ("libro", "book"), ("hablar", "to speak")]
COMPANIES = [("Acme Foods", "packaged food"), ("Borealis Energy", "oil and gas"),
             ("Cobalt Systems", "semiconductor products"), ("Delta Pharma", "prescription medicines")]


def _other(i: int, items: list) -> tuple:
    return items[(i + 5) % len(items)]


def _qa(with_category: bool = False) -> list[tuple]:
    """(question, context, answer[, Dolly category]) shared by the instruction-style fixtures."""
    rows = []
    for city, country in CAPITALS:
        rows.append((f"Which country is {city} in?", "", f"{city} is in {country}.", "open_qa"))
        rows.append((f"What is the capital of {country}?", f"{city} is the capital and largest city of {country}.",
                     f"The capital of {country} is {city}.", "closed_qa"))
        rows.append(("Summarize the passage.", f"{city} is a city in {country}. Many people visit {city} every year.",
                     f"{city} is a popular city in {country}.", "summarization"))
    return rows if with_category else [r[:3] for r in rows]


def dolly() -> list[dict]:
    return [{"instruction": q, "context": c, "response": a, "category": cat} for q, c, a, cat in _qa(True)]


def alpaca() -> list[dict]:
    rows = []
    for q, c, a in _qa():
        text = f"### Instruction:\n{q}\n\n" + (f"### Input:\n{c}\n\n" if c else "") + f"### Response:\n{a}"
        rows.append({"instruction": q, "input": c, "output": a, "text": text})
    return rows


def alpaca_cleaned() -> list[dict]:
    return [{"instruction": q, "input": c, "output": a} for q, c, a in _qa()]


def hc3() -> list[dict]:
    return [{"id": str(i), "question": q + (f" {c}" if c else ""), "human_answers": [a],
             "chatgpt_answers": [f"Sure! {a}"], "source": "open_qa"} for i, (q, c, a) in enumerate(_qa())]


def evol_instruct() -> list[dict]:
    return [{"instruction": q + (f"\n{c}" if c else ""), "output": a} for q, c, a in _qa()]


def lima() -> list[dict]:
    """Tulu v2 mixture rows from LIMA: mostly single-turn, plus two multi-turn ones (recipes filter them)."""
    rows = [{"dataset": "lima", "id": f"lima_{i}", "messages": [{"role": "user", "content": q + (f"\n{c}" if c else "")},
                                                                {"role": "assistant", "content": a}]}
            for i, (q, c, a) in enumerate(_qa())]
    for i, (city, country) in enumerate(CAPITALS[:2]):
        rows.append({"dataset": "lima", "id": f"lima_multi_{i}", "messages": [
            {"role": "user", "content": f"Where is {city}?"}, {"role": "assistant", "content": f"In {country}."},
            {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Yes."}]})
    return rows


def helpsteer2_dpo() -> list[dict]:
    return [{"prompt": f"Which country is {city} in?", "chosen": f"{city} is in {country}.",
             "rejected": f"{city} is in {_other(i, CAPITALS)[1]}."} for i, (city, country) in enumerate(CAPITALS)]


def truthfulqa_mc() -> list[dict]:
    rows = []
    for i, (city, country) in enumerate(CAPITALS):
        wrong = [_other(i, CAPITALS)[1], _other(i + 3, CAPITALS)[1]]
        right = [f"{city} is in {country}.", f"It is in {country}."]
        rows.append({"question": f"Which country is {city} in?",
                     "mc1_targets": {"choices": [right[0]] + [f"{city} is in {w}." for w in wrong],
                                     "labels": [1, 0, 0]},
                     "mc2_targets": {"choices": right + [f"{city} is in {w}." for w in wrong],
                                     "labels": [1, 1, 0, 0]}})
    return rows


def cities(negated: bool = False) -> list[dict]:
    rows, verb = [], "is not in" if negated else "is in"
    for i, (city, country) in enumerate(CAPITALS):
        for shown in (country, _other(i, CAPITALS)[1]):
            label = int((shown == country) != negated)
            rows.append({"statement": f"The city of {city} {verb} {shown}.", "label": label, "city": city,
                         "country": shown, "correct_country": country})
    return rows


def comparisons(word: str) -> list[dict]:
    rows = []
    for i, a in enumerate(NUMBERS):
        for j, b in enumerate(NUMBERS):
            if i != j:
                n1, n2 = 51 + i, 51 + j
                label = int(n1 > n2) if word == "larger" else int(n1 < n2)
                rows.append({"statement": f"{a.capitalize()} is {word} than {b}.", "label": label,
                             "n1": n1, "n2": n2, "diff": n1 - n2, "abs_diff": abs(n1 - n2)})
    return rows


def translations(negated: bool = False) -> list[dict]:
    rows, verb = [], "does not mean" if negated else "means"
    for i, (es, en) in enumerate(SPANISH):
        for shown in (en, SPANISH[(i + 3) % len(SPANISH)][1]):
            rows.append({"statement": f"The Spanish word '{es}' {verb} '{shown}'.", "label": int((shown == en) != negated)})
    return rows


def companies() -> list[dict]:
    rows = []
    for i, (name, business) in enumerate(COMPANIES):
        for shown in (business, COMPANIES[(i + 1) % len(COMPANIES)][1]):
            rows.append({"statement": f"{name} engages in the manufacture and sale of {shown}.",
                         "label": int(shown == business)})
    return rows


def common_claims() -> list[dict]:
    return [{"statement": f"{city} is a city.", "label": 1} for city, _ in CAPITALS[:8]] + \
           [{"statement": f"{country} is a city.", "label": 0} for _, country in CAPITALS[:8]]


FIXTURES = {
    "dolly": ("jsonl", dolly), "alpaca": ("jsonl", alpaca), "alpaca-cleaned": ("jsonl", alpaca_cleaned),
    "hc3": ("jsonl", hc3), "evol-instruct": ("jsonl", evol_instruct), "lima": ("jsonl", lima),
    "helpsteer2-dpo": ("jsonl", helpsteer2_dpo), "truthfulqa-mc": ("jsonl", truthfulqa_mc),
    "cities": ("csv", cities), "neg_cities": ("csv", lambda: cities(negated=True)),
    "larger_than": ("csv", lambda: comparisons("larger")), "smaller_than": ("csv", lambda: comparisons("smaller")),
    "sp_en_trans": ("csv", translations), "neg_sp_en_trans": ("csv", lambda: translations(negated=True)),
    "companies_true_false": ("csv", companies), "common_claim_true_false": ("csv", common_claims),
}


def path(name: str) -> Path:
    """File of fixture `name`, written (atomically) on first use."""
    from llmrepro.tiny import cache_dir

    ext, make = FIXTURES[name]
    out = cache_dir() / "fixtures" / f"v{FIXTURES_VERSION}" / f"{name}.{ext}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = make()
    with open(tmp, "w", newline="") as f:
        if ext == "csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, out)
    return out


def corpus() -> list[str]:
    """All fixture text plus prompt markup: what the tiny tokenizer is trained on."""
    texts = ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", "### Instruction:\n", "### Input:\n",
             "### Response:\n", "### End", "Below is an instruction that describes a task. "
             "Write a response that appropriately completes the request."]
    for _, make in FIXTURES.values():
        for row in make():
            texts.append(json.dumps(row))
    return texts
