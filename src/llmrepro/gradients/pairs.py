"""Pairs of samples for gradient similarity: the originals (LIMA), their variants (paraphrased or
model-generated, linked by id), each variant's BM25 candidates, and the dot products of a pair set.

`PairsConfig` is the config section gradient-similarity and layer-dot-products share; `rules_paraphrase`
is a deterministic word-substitution rewording (no model) for tests and self-contained smoke runs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.gradients.candidates import TOP_K, bm25_candidates, first_message
from llmrepro.gradients.dot_products import (
    DotProducts,
    TensorProjector,
    projection_total,
    stream_dot_products,
)
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.models import ModelConfig

RULES = {"what": "which", "which": "what", "capital": "capital city", "summarize": "sum up", "passage": "text",
         "country": "nation", "city": "town", "popular": "well-liked", "many": "lots of", "visit": "go to",
         "every": "each", "largest": "biggest", "people": "folks"}


def single_turn(rows: list[dict]) -> list[dict]:
    """Rows with exactly one user and one assistant message, as the source selected from LIMA."""
    return [r for r in rows if [m["role"] for m in r["messages"]] == ["user", "assistant"]]


def rules_paraphrase(text: str) -> str:
    """Deterministic rewording by word substitution: no model, for tests and self-contained smoke runs."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = RULES.get(word.lower(), word)
        return new.capitalize() if word[0].isupper() else new
    return "In other words: " + re.sub(r"[A-Za-z]+", swap, text)


def rules_variants(originals: list[dict]) -> list[dict]:
    return [{"id": r["id"], "dataset": r.get("dataset"), "kind": "paraphrased",
             "messages": [{"role": m["role"], "content": rules_paraphrase(m["content"])} for m in r["messages"]]}
            for r in originals]


def read_variants(path: str | Path) -> list[dict]:
    """Rows of a variants.jsonl (or of the one in a run directory), checked for id and [user, assistant]."""
    p = Path(path).expanduser()
    p = p / "variants.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"variants not found: {p} (run make-variants first, or give its run directory)")
    try:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not JSON lines ({err})") from None
    for i, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        roles = [m.get("role") for m in msgs] if isinstance(msgs, list) else None
        if "id" not in row or roles != ["user", "assistant"]:
            raise UserError(f"{p}: row {i}: expected an 'id' and messages [user, assistant]")
    if not rows:
        raise UserError(f"{p}: no rows")
    return rows


class PairsConfig(RecipeConfig):
    """What gradient-similarity and layer-dot-products share: model, originals, variants, candidates, schedule."""

    model: ModelConfig
    data: DataConfig  # the originals: single-turn chat rows (Tulu v2 LIMA); multi-turn rows are skipped
    variants: RunRef | None = None  # a make-variants run; None: rules_paraphrase of data
    top_k: int = Field(TOP_K, ge=1)
    max_length: int = Field(2048, ge=8)
    chunk_size: int = Field(8, ge=1)  # paraphrased gradients held at once
    batch_size: int = Field(8, ge=1)  # candidate gradients computed per vmap call
    partition_start: int = Field(0, ge=0)  # paraphrased samples [start, end) of this job
    partition_end: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.data.format != "chat":
            raise ValueError("needs chat data (data.format: chat)")
        if self.partition_end is not None and self.partition_end <= self.partition_start:
            raise ValueError(f"partition_end ({self.partition_end}) must be greater than partition_start "
                             f"({self.partition_start})")
        return self


@dataclass
class Pairs:
    variants: list[dict]
    originals: list[dict]
    candidates: list[list[int]]

    @property
    def p_ids(self) -> list[str]:
        return [r["id"] for r in self.variants]

    @property
    def o_ids(self) -> list[str]:
        return [r["id"] for r in self.originals]


def load_pairs(cfg: PairsConfig, ctx) -> Pairs:
    """Originals, variants (linked by id) and each variant's BM25 candidates."""
    originals = single_turn(data.load_rows(cfg.data, ctx))
    if not originals:
        raise UserError(f"{cfg.data.name}: no single-turn [user, assistant] rows")
    variants = read_variants(ctx.require(cfg.variants, "make-variants").path) if cfg.variants \
        else rules_variants(originals)
    index = {r["id"]: i for i, r in enumerate(originals)}
    if cfg.partition_start >= len(variants):
        raise UserError(f"partition_start={cfg.partition_start} is past the last of {len(variants)} variants")
    candidates = bm25_candidates([first_message(v) for v in variants], [first_message(o) for o in originals],
                                 [index.get(v["id"]) for v in variants], cfg.top_k)
    return Pairs(variants, originals, candidates)


def compute_dot_products(cfg: PairsConfig, pairs: Pairs, ctx, projection=None) -> DotProducts:
    """Stream the per-tensor dot products of cfg's partition: prompt-masked SFT loss, model in eval mode,
    optionally on per-tensor projections (`projection`: a gradient-similarity ProjectionConfig)."""
    import torch

    from llmrepro.gradients import encoding, per_sample
    from llmrepro.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, ctx=ctx).eval()
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    project = None
    if projection is not None:
        total = projection_total(sum(sizes.values()), projection.fraction)
        spec = projection.spec(total, cfg.seed)
        project = TensorProjector(sizes, spec, next(model.parameters()).device)
        ctx.log.info("projection: %d dims (%.2f%% of %d parameters) over %d tensors, %s", total,
                     100 * projection.fraction, sum(sizes.values()), len(project.projectors), spec.type.value)
    encoded: dict[tuple[str, int], dict] = {}

    def grads(kind: str, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = pairs.variants if kind == "p" else pairs.originals
        examples = [encoded.setdefault((kind, i), encoding.encode(rows[i], "chat", tokenizer, "sft", cfg.max_length))
                    for i in idx]
        g = per_sample.per_sample_grads(model, encoding.collate(examples, tokenizer.pad_token_id), "sft")
        g = {n: t.reshape(len(idx), -1) for n, t in g.items()}
        return project(g) if project else g

    return stream_dot_products(grads, pairs.candidates, chunk_size=cfg.chunk_size, batch_size=cfg.batch_size,
                               start=cfg.partition_start, end=cfg.partition_end, progress=ctx.progress)
