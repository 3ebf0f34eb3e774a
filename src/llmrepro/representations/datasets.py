"""The thesis' truth datasets, read from the real files unchanged, in its two constructions:

- `detection` (Detection notebook @ c43c1f5, cells 3-7, 12): one statement per row with a label and a group, the
  first `limit` (4000) rows, no shuffle:
  - truthfulqa: TruthfulQA.csv, per question its correct then its incorrect answers as f"{question} {answer}."
    (the thesis read HF `truthful_qa/generation`; the local CSV is another version: 6233 statements, not 5918);
  - politicians: `Politicians_experiment2_prepared.csv` as written (Statements, isTrue, Group);
  - cities / neg_cities: group = the city; common_claim_true_false and the other statement sets: one group per row;
    counterfact_true_false: group = (subject, relation).
- `mc` (ITI notebooks @ a0bb04c, cells 7-21): questions with choices, six few-shot groups taken out of each set
  (TruthfulQA: its fixed QA primer), and the statements derived from them (`to_detection_dataframe`).

Each `TruthData` names a dataset and its file; without `path` it reads the bundled fixture of the same shape.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmrepro.core.config import Strict
from llmrepro.core.errors import UserError
from llmrepro.lm import mc
from llmrepro.lm.mc import MCItem

DatasetName = Literal["truthfulqa", "politicians", "cities", "neg_cities", "common_claim_true_false",
                      "counterfact_true_false", "companies_true_false", "larger_than", "smaller_than", "sp_en_trans",
                      "neg_sp_en_trans"]
FIXTURE = {"truthfulqa": "truthfulqa-csv", "politicians": "politicians", "counterfact_true_false": "counterfact_true_false"}
FEW_SHOT_GROUPS = {"politicians": [0, 1, 3, 4, 5, 7]}  # ITI cell 17 (Obama, Harper, Sarkozy, Merkel, Modi, R. Gandhi)
MC_LIMITS = {"counterfact_true_false": 1000, "common_claim_true_false": 500}  # cells 8, 10 (500 per label)


class TruthData(Strict):
    name: DatasetName
    form: Literal["detection", "mc"] = "detection"
    path: str | None = None  # the real file (e.g. ../shared/data/geometry-of-truth/cities.csv); default: the fixture
    mc_path: str | None = None  # truthfulqa, form mc: mc_task.json (mc2 choices), `path` TruthfulQA.csv for the
    # categories; with `path` alone the CSV's answers (periods appended) are the choices
    limit: int | None = Field(4000, ge=1)  # detection: the first N statements (the thesis' head slice)
    label: str | None = None  # the name the run stores it under (default: name, plus "_mc" for form mc)

    @property
    def key(self) -> str:
        return self.label or (self.name + ("_mc" if self.form == "mc" else ""))


@dataclass
class Statements:
    texts: list[str]
    labels: list[int]
    groups: list[int]
    partition: list[str]  # the label the ITI partitions stratify on (isTrue, x Category for TruthfulQA)


def _file(spec: TruthData, attr: str = "path") -> Path:
    from llmrepro.lm import fixtures

    given = getattr(spec, attr)
    if given is None:
        if attr == "mc_path":
            return fixtures.path("truthfulqa-mc")
        return fixtures.path(FIXTURE.get(spec.name, spec.name))
    path = Path(given).expanduser()
    if not path.is_file():
        raise UserError(f"dataset {spec.name}: file not found: {given}")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _need(rows: list[dict], cols: tuple[str, ...], where) -> None:
    if not rows or any(c not in rows[0] for c in cols):
        raise UserError(f"{where}: expected columns {', '.join(cols)}")


def _codes(values: list) -> list[int]:
    """Group ids in order of first appearance."""
    seen: dict = {}
    return [seen.setdefault(v, len(seen)) for v in values]


# ---------------------------------------------------------------------------------------------------- detection


def detection(spec: TruthData) -> Statements:
    path = _file(spec)
    if spec.name == "truthfulqa":
        rows = mc.read_truthfulqa_csv(path)
        texts, labels, groups, part = [], [], [], []
        for i, r in enumerate(rows):
            for label, col in ((1, "Correct Answers"), (0, "Incorrect Answers")):
                for a in (x.strip() for x in r[col].split(";")):
                    if a:
                        texts.append(f"{r['Question']} {a}.")
                        labels.append(label)
                        groups.append(i)
                        part.append(f"{label} x {r['Category']}")
        out = Statements(texts, labels, groups, part)
    elif spec.name == "politicians":
        rows = read_csv(path)
        _need(rows, ("Statements", "isTrue", "Group"), path)
        out = Statements([r["Statements"] for r in rows], [int(float(r["isTrue"])) for r in rows],
                         [int(float(r["Group"])) for r in rows], [str(int(float(r["isTrue"]))) for r in rows])
    else:
        rows = read_csv(path)
        _need(rows, ("statement", "label"), path)
        if spec.name in ("cities", "neg_cities"):
            groups = _codes([r["city"] for r in rows])
        elif spec.name == "counterfact_true_false":
            groups = _codes([(r["subject"], r["relation"]) for r in rows])
        else:
            groups = list(range(len(rows)))
        labels = [int(r["label"]) for r in rows]
        out = Statements([r["statement"] for r in rows], labels, groups, [str(v) for v in labels])
    if spec.limit is not None:
        out = Statements(*(x[: spec.limit] for x in (out.texts, out.labels, out.groups, out.partition)))
    if len(set(out.labels)) < 2:
        raise UserError(f"dataset {spec.name}: needs both true and false statements")
    return out


# ----------------------------------------------------------------------------------------------------------- mc


def _grouped(rows: list[dict], key) -> list[list[dict]]:
    """pandas `groupby(key)` order: groups sorted by key, rows in file order within each."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return [groups[k] for k in sorted(groups)]


def _item(question: str, choices: list[str], correct: list[int], statements: list[str], group) -> MCItem:
    return MCItem(question, choices, [int(i in correct) for i in range(len(choices))], group=group,
                  meta={"statements": statements})


def _few_shot(items: list[MCItem], groups: list) -> tuple[list[MCItem], str]:
    chosen = [it for it in items if it.group in groups]
    block = "".join(f"Q: {it.question}\nA: {it.choices[it.labels.index(1)]}\n\n" for it in chosen)
    return [it for it in items if it.group not in groups], block


def mc_items(spec: TruthData) -> list[MCItem]:
    """The ITI notebooks' MC frame of one dataset, few-shot groups removed, each item carrying its few-shot block."""
    if spec.name == "truthfulqa":
        if spec.mc_path is None and spec.path is not None:  # only TruthfulQA.csv: its answers as the MC2 choices
            items = mc.truthfulqa_csv_items(mc.read_truthfulqa_csv(_file(spec)))
        else:
            items = mc.load_items(mc.MCData(name=str(_file(spec, "mc_path")), format="multiple-choice"))
        categories = {r["Question"].strip(): r["Category"] for r in mc.read_truthfulqa_csv(_file(spec))}
        for i, it in enumerate(items):
            it.group, it.few_shot = i, mc.QA_PRIMER + "\n\n"
            it.meta = {"statements": [f"Q: {it.question}\nA: {c}" for c in it.choices],
                       "category": categories.get(it.question.strip())}
        return items
    path = _file(spec)
    rows = read_csv(path)
    items: list[MCItem] = []
    if spec.name == "politicians":
        _need(rows, ("nameLabel", "educationLabel", "isTrue", "Group"), path)
        for rs in _grouped(rows, lambda r: int(float(r["Group"]))):
            name, choices = rs[0]["nameLabel"], [r["educationLabel"] for r in rs]
            correct = [i for i, r in enumerate(rs) if int(float(r["isTrue"]))]
            items.append(_item(f"Which university did {name} attend?", choices, correct,
                               [f"{name} attended {c}." for c in choices], int(float(rs[0]["Group"]))))
    elif spec.name == "common_claim_true_false":
        _need(rows, ("statement", "label"), path)
        for label in (0, 1):  # the first 500 of each label, label 0 first (cell 10)
            kept = [(i, r) for i, r in enumerate(rows) if int(r["label"]) == label][: MC_LIMITS[spec.name]]
            for i, r in kept:
                s = r["statement"][0].lower() + r["statement"][1:]
                items.append(_item(f"Is it true that {s[:-1]}?", ["No", "Yes"], [label],
                                   [f"It is incorrect that {s}", f"It is correct that {s}"], i))
    elif spec.name in ("cities", "neg_cities"):
        _need(rows, ("statement", "label", "city", "country"), path)
        neg = spec.name == "neg_cities"
        for g, rs in enumerate(_grouped(rows, lambda r: r["city"])):
            city, choices = rs[0]["city"], [r["country"] for r in rs]
            verb = "is not in" if neg else "is in"
            items.append(_item(f"Which country is the city of {city} {'not in' if neg else 'in'}?", choices,
                               [i for i, r in enumerate(rs) if int(r["label"])],
                               [f"The city of {city} {verb} {c}." for c in choices], g))
    elif spec.name == "counterfact_true_false":
        _need(rows, ("statement", "label", "relation", "subject", "target"), path)
        for g, rs in enumerate(_grouped(rows, lambda r: (r["subject"], r["relation"]))[: MC_LIMITS[spec.name]]):
            prefix = rs[0]["relation"].replace("{}", rs[0]["subject"])
            choices = [r["target"] for r in rs]
            items.append(_item(prefix, choices, [i for i, r in enumerate(rs) if int(r["label"])],
                               [f"{prefix} {c}" for c in choices], g))
    else:
        raise UserError(f"dataset {spec.name} has no multiple-choice form in the thesis (use form: detection)")
    items = [it for it in items if any(it.labels)]
    items, block = _few_shot(items, FEW_SHOT_GROUPS.get(spec.name, [0, 1, 2, 3, 4, 5]))
    for it in items:
        it.few_shot = block
    return items


def mc_statements(items: list[MCItem], with_category: bool = False) -> Statements:
    """`to_detection_dataframe` (cell 19): one statement per (question, choice); PartitionLabel = isTrue, or
    f"{isTrue} x {Category}" for TruthfulQA."""
    texts, labels, groups, part = [], [], [], []
    for it in items:
        for s, y in zip(it.meta["statements"], it.labels, strict=True):
            texts.append(s)
            labels.append(y)
            groups.append(int(it.group))
            part.append(f"{y} x {it.meta.get('category')}" if with_category else str(y))
    return Statements(texts, labels, groups, part)


def statements(spec: TruthData) -> Statements:
    if spec.form == "detection":
        return detection(spec)
    return mc_statements(mc_items(spec), with_category=spec.name == "truthfulqa")
