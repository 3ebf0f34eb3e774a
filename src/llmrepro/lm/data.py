"""Datasets, in one place: a hub id (with revision), a local file (jsonl, json, csv, parquet) or a bundled
fixture (`fixture:<name>`), read through `datasets.load_dataset` and checked against the columns of the
format the recipe expects. A malformed row is reported by row number and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from llmrepro.core import io, logs
from llmrepro.core.config import Strict
from llmrepro.core.errors import UserError
from llmrepro.lm import fixtures

# format -> {column: type}: the columns of the real datasets that each recipe reads.
FORMATS: dict[str, dict[str, type]] = {
    "dolly": {"instruction": str, "context": str, "response": str, "category": str},
    "alpaca": {"instruction": str, "input": str, "output": str},
    "hc3": {"question": str, "human_answers": list, "chatgpt_answers": list},
    "evol-instruct": {"instruction": str, "output": str},
    "chat": {"messages": list},
    "lima": {"conversations": list, "source": str},  # GAIR/lima plain_text (alternating turns)
    "preference": {"prompt": str, "chosen": str, "rejected": str},
    "helpsteer2-dpo": {"prompt": str, "chosen_response": str, "rejected_response": str},  # Atsunori/HelpSteer2-DPO
    "dpo-helpsteer": {"prompt": str, "chosen": list, "rejected": list},  # Columbia-NLP/DPO-HelpSteer (messages)
    "binary-choice": {"question": str, "choices": list, "label": int},  # EleutherAI/truthful_qa_binary
    "multiple-choice": {"question": str, "mc1_targets": dict, "mc2_targets": dict},
    "true-false": {"statement": str, "label": int},
    # the gradient-similarity source's published variants (lukashinterleitner/LIMA-*), joined to originals on `id`
    "paraphrased": {"id": str, "paraphrased_messages": list},
    "model-generated": {"id": str, "model_generated_messages": list},
}
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Format = Literal["dolly", "alpaca", "hc3", "evol-instruct", "chat", "preference", "helpsteer2-dpo", "dpo-helpsteer",
                 "binary-choice", "multiple-choice", "true-false", "paraphrased", "model-generated", "lima"]


class DataConfig(Strict):
    name: str  # fixture:<name>, a local file, or a hub dataset id
    format: Format
    revision: str | None = None  # hub revision (commit sha or tag)
    subset: str | None = None  # hub configuration name
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # first N rows only


def _source(cfg: DataConfig) -> tuple[str, Path | None]:
    """('fixture'|'file'|'hub', local path or None)."""
    if cfg.name.startswith("fixture:"):
        name = cfg.name.removeprefix("fixture:")
        if name not in fixtures.FIXTURES:
            raise UserError(f"unknown fixture '{name}' (available: {', '.join(sorted(fixtures.FIXTURES))})")
        return "fixture", fixtures.path(name)
    path = Path(cfg.name).expanduser()
    if path.suffix in BUILDERS or path.exists() or cfg.name.startswith((".", "/", "~")):
        if not path.is_file():
            raise UserError(f"dataset file not found: {cfg.name}")
        if path.suffix not in BUILDERS:
            raise UserError(f"dataset file {cfg.name}: unsupported extension (use {', '.join(BUILDERS)})")
        return "file", path
    return "hub", None


def load_rows(cfg: DataConfig, ctx=None) -> list[dict]:
    """All rows (or the first `limit`) as dicts, validated against `cfg.format`; records provenance in ctx."""
    import datasets

    kind, path = _source(cfg)
    if path is not None and not path.read_bytes().strip():
        raise UserError(f"dataset {cfg.name}: the file is empty (format {cfg.format} needs rows with "
                        f"{', '.join(FORMATS[cfg.format])})")
    logs.adopt_library_loggers()  # datasets installed its own terminal handler at import
    datasets.disable_progress_bars()
    try:
        if path is not None:
            ds = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(cfg.name, cfg.subset, revision=cfg.revision, split=cfg.split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        if kind != "hub":
            raise UserError(f"dataset {cfg.name}: cannot read: {str(err).splitlines()[0]}") from None
        raise UserError(f"dataset '{cfg.name}' not found (offline, or not on the hub): "
                        f"{str(err).splitlines()[0]}") from None
    except datasets.exceptions.DatasetGenerationError as err:
        raise UserError(f"dataset {cfg.name}: cannot parse: {err.__cause__ or err}") from None
    except StopIteration:  # datasets' builders when a file has no record at all (e.g. only blank lines)
        raise UserError(f"dataset {cfg.name}: no rows") from None
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    rows = ds.to_list()
    check_rows(rows, cfg.format, cfg.name)
    if ctx is not None:
        ctx.record_input("datasets", cfg.name, source=kind, revision=cfg.revision, subset=cfg.subset, split=cfg.split,
                         sha256=io.sha256_file(path) if path else None,
                         fingerprint=None if path else ds._fingerprint, rows=len(rows))
    return rows


def check_rows(rows: list[dict], fmt: str, source: str) -> None:
    columns = FORMATS[fmt]
    if not rows:
        raise UserError(f"dataset {source}: no rows")
    for i, row in enumerate(rows):
        for col, typ in columns.items():
            if col not in row:
                raise UserError(f"dataset {source}: row {i}: missing column '{col}' (format {fmt} needs "
                                f"{', '.join(columns)})")
            value = row[col]
            if value is None:  # the json loader fills a key missing from some rows with null
                raise UserError(f"dataset {source}: row {i}, column '{col}': missing value")
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise UserError(f"dataset {source}: row {i}, column '{col}': expected {typ.__name__}, "
                                f"got {type(value).__name__} {value!r:.40}")


def to_instruction(row: dict, fmt: str, hc3_answers: str = "human") -> dict:
    """Normalise one instruction-data row to {instruction, input, response, category}."""
    if fmt == "dolly":
        return {"instruction": row["instruction"], "input": row["context"], "response": row["response"],
                "category": row["category"]}
    if fmt == "alpaca":
        return {"instruction": row["instruction"], "input": row["input"], "response": row["output"], "category": None}
    if fmt == "hc3":
        answers = row[f"{hc3_answers}_answers"]
        return {"instruction": row["question"], "input": "", "response": answers[0] if answers else "", "category": None}
    if fmt == "evol-instruct":
        return {"instruction": row["instruction"], "input": "", "response": row["output"], "category": None}
    raise UserError(f"format '{fmt}' is not instruction data (use dolly, alpaca, hc3 or evol-instruct)")
