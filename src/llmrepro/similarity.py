"""Gradient similarity of paraphrased samples against BM25-selected candidate originals, streamed.

For each paraphrased sample p, BM25 over the originals' first message picks `top_k` candidates (the true
original replaces the last slot when it is missing). For every pair (p, o) and every parameter tensor t we
accumulate D_po[t] = <g_p[t], g_o[t]>, D_pp[t] and D_oo[t]; from these

    per-tensor cosine = D_po / sqrt(D_pp D_oo),   full cosine = sum D_po / sqrt(sum D_pp sum D_oo).

Streaming: paraphrased samples are processed in chunks of `chunk_size`; a chunk's per-sample gradients are
held while its candidates' gradients are produced `batch_size` at a time, and per-tensor dot products are
taken as matrix products. Memory is (chunk_size + batch_size) gradient buffers whatever the sample count;
the price is that an original shared by several chunks has its gradient computed once per chunk, which
chunks grouped by shared candidates (`plan_chunks`) keep low.

Partitions: the chunk plan is fixed by the whole candidate list, and a partition [start, end) runs exactly
the chunks that hold its samples, so every number it reports was computed the same way as in the single
run: merging partitions gives the single run's result exactly.

Projection (optional): each tensor's gradient is projected on its own with a traker projector whose seed is
derived from the tensor name with crc32 (the source used Python's salted `hash()`, which changes between
processes), to a dimension proportional to its size; the dimensions sum to the requested total.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from llmrepro import data
from llmrepro.data import DataConfig
from llmrepro.errors import UserError
from llmrepro.models import ModelConfig
from llmrepro.recipes.base import RecipeConfig

TOP_K = 5
PROJECTION_MULTIPLE = 512

# component -> substrings of a parameter name (first match wins), as in the source's layer analysis
COMPONENTS = {
    "embed": ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions", "lm_head", "embed_out"),
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "attn.c_proj", "out_proj", "dense."),
    "gate": ("gate_proj",), "up": ("up_proj", "c_fc", "fc1", "dense_h_to_4h"),
    "down": ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h"),
    "norms": ("norm", "ln_"),
}


def component(name: str) -> str:
    """The component (embed, q, k, v, o, gate, up, down, norms) a parameter tensor belongs to, or 'other'."""
    for comp, keys in COMPONENTS.items():
        if any(k in name for k in keys):
            return comp
    return "other"


# ---------------------------------------------------------------------------------------------------------
# Candidates


def first_message(row: dict) -> str:
    return row["messages"][0]["content"]


def bm25_candidates(queries: list[str], corpus: list[str], truth: list[int | None], k: int = TOP_K) -> list[list[int]]:
    """Indices into `corpus` of the top-k BM25 matches of each query (whitespace tokens, Okapi k1=1.5, b=0.75,
    ties in corpus order); the true original `truth[i]` replaces the last slot when it is not among them."""
    import bm25s

    if k > len(corpus):
        raise UserError(f"top_k={k} is larger than the {len(corpus)} originals")
    index = bm25s.BM25(method="robertson", k1=1.5, b=0.75)
    index.index([doc.split() for doc in corpus], show_progress=False)
    out = []
    for query, true in zip(queries, truth, strict=True):
        tokens = [t for t in query.split() if t in index.vocab_dict]
        scores = index.get_scores(tokens) if tokens else np.zeros(len(corpus))
        top = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
        if true is not None and true not in top:
            top[-1] = true
        out.append(top)
    return out


# ---------------------------------------------------------------------------------------------------------
# Projection


def projection_total(num_params: int, fraction: float) -> int:
    """`fraction` of the parameter count rounded to a multiple of 512 (at least 512), as in the source."""
    return max(PROJECTION_MULTIPLE, round(num_params * fraction / PROJECTION_MULTIPLE) * PROJECTION_MULTIPLE)


def split_dims(sizes: dict[str, int], total: int, multiple: int = 1) -> dict[str, int]:
    """`total` split over tensors in proportion to their sizes, in units of `multiple` (512 for the CUDA
    projector), by largest remainder so the parts sum to `total`; tensors whose share rounds to 0 are left out."""
    n, units = sum(sizes.values()), total // multiple
    if total > n:
        raise UserError(f"projection dimension {total} exceeds the {n} parameters")
    exact = {name: units * size / n for name, size in sizes.items()}
    dims = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (dims[name] - exact[name], name))
    for name in by_remainder[: units - sum(dims.values())]:
        dims[name] += 1
    return {name: d * multiple for name, d in dims.items() if d > 0}


def tensor_seed(name: str, seed: int) -> int:
    """Per-tensor projection seed, the same in every process (crc32, not Python's salted hash())."""
    return (seed + zlib.crc32(name.encode())) % 2**31


class TensorProjector:
    """Projects each tensor's flattened per-sample gradients (B, n_t) on its own, with its share of
    `spec.dim` and its own seed, through `llmrepro.projection` (traker's basic or CUDA projector)."""

    def __init__(self, sizes: dict[str, int], spec: Projection, device="cpu"):  # noqa: F821
        from llmrepro.projection import CUDA_DIM_MULTIPLE, Projector, ProjectorKind

        multiple = CUDA_DIM_MULTIPLE if spec.projector == ProjectorKind.cuda else 1
        self.projectors = {name: Projector(spec.model_copy(update={"dim": dim, "seed": tensor_seed(name, spec.seed)}),
                                           sizes[name], device)
                           for name, dim in split_dims(sizes, spec.dim, multiple).items()}

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: F821
        return {name: proj.project(grads[name]) for name, proj in self.projectors.items()}


# ---------------------------------------------------------------------------------------------------------
# Streaming dot products

GradFn = Callable[[str, list[int]], dict[str, "torch.Tensor"]]  # noqa: F821  ('p'|'o', indices) -> name -> (B, n)


def plan_chunks(candidates: list[list[int]], chunk_size: int) -> list[tuple[list[int], list[int]]]:
    """(paraphrased indices, sorted union of their candidate originals) per chunk of the whole run.

    A chunk starts from the first unplaced sample and greedily takes the unplaced samples whose candidates
    overlap its union most (ties: lowest index): an original shared by several samples is then computed
    once for all of them instead of once per chunk they fall in. The plan depends only on the candidate
    lists, so every partition of a run computes the same chunks."""
    left, sets, chunks = list(range(len(candidates))), [set(c) for c in candidates], []
    while left:
        ps, union = [left.pop(0)], set()
        union |= sets[ps[0]]
        while len(ps) < chunk_size and left:
            best = max(left, key=lambda p: (len(union & sets[p]), -p))
            left.remove(best)
            ps.append(best)
            union |= sets[best]
        chunks.append((sorted(ps), sorted(union)))
    return chunks


@dataclass
class DotProducts:
    """Per-tensor dot products, float64 arrays over `tensors`: pairs[(p, o)] = (D_po, D_oo) with D_oo as computed
    next to D_po, paraphrased[p] = D_pp, original[o] = D_oo as first computed (the source's three dicts)."""

    tensors: dict[str, int]  # name -> number of parameters (or projected dims), in model order
    candidates: dict[int, list[int]]  # p -> candidate originals in BM25 order
    pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    paraphrased: dict[int, np.ndarray] = field(default_factory=dict)
    original: dict[int, np.ndarray] = field(default_factory=dict)

    def matrices(self) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
        """(pairs in order, D_po, D_pp, D_oo), each (n_pairs, n_tensors)."""
        keys = [(p, o) for p, cands in self.candidates.items() for o in cands]
        po = np.stack([self.pairs[k][0] for k in keys])
        pp = np.stack([self.paraphrased[p] for p, _ in keys])
        oo = np.stack([self.pairs[k][1] for k in keys])
        return keys, po, pp, oo


def stream_dot_products(grads: GradFn, candidates: list[list[int]], *, chunk_size: int, batch_size: int,
                        start: int = 0, end: int | None = None, progress=lambda it, **_: it) -> DotProducts:
    """Dot products of paraphrased samples [start, end) with their candidates, holding at most
    chunk_size + batch_size per-sample gradients at a time.

    A chunk is always computed whole, as planned for the single run (padding, and so the last bits of a
    gradient, depend on which samples share a batch): that is what makes partitions merge exactly."""
    import torch

    end = len(candidates) if end is None else end
    chunks = [(ps, os) for ps, os in plan_chunks(candidates, chunk_size) if any(start <= p < end for p in ps)]
    out = None
    for ps, os in progress(chunks, desc="gradient dot products", total=len(chunks)):
        keep = [i for i, p in enumerate(ps) if start <= p < end]
        P = grads("p", ps)
        if out is None:
            out = DotProducts({n: g[0].numel() for n, g in P.items()}, {})
        P = {n: g.reshape(len(ps), -1) for n, g in P.items()}
        pp = torch.stack([(g * g).sum(1) for g in P.values()], 1).double().numpy()  # (c, T)
        for i in keep:
            out.paraphrased[ps[i]] = pp[i]
            out.candidates[ps[i]] = list(candidates[ps[i]])
        for b in range(0, len(os), batch_size):
            batch = os[b:b + batch_size]
            Q = {n: g.reshape(len(batch), -1) for n, g in grads("o", batch).items()}  # candidates' gradients
            po = torch.stack([P[n] @ Q[n].T for n in P], 2).double().numpy()  # (c, b, T)
            oo = torch.stack([(g * g).sum(1) for g in Q.values()], 1).double().numpy()  # (b, T)
            for j, o in enumerate(batch):
                pairs = [i for i in keep if o in candidates[ps[i]]]
                if pairs:
                    out.original.setdefault(o, oo[j])
                for i in pairs:
                    out.pairs[(ps[i], o)] = (po[i, j], oo[j])
            del Q
        del P
    if out is None:
        raise UserError(f"partition [{start}, {end}) holds no samples (there are {len(candidates)})")
    return out


# ---------------------------------------------------------------------------------------------------------
# Similarities, JSON, merge


def cosines(po: np.ndarray, pp: np.ndarray, oo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full cosine per pair (n_pairs,), per-tensor cosine (n_pairs, n_tensors)); 0 where a norm is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        full = po.sum(1) / np.sqrt(pp.sum(1) * oo.sum(1))
        per = po / np.sqrt(pp * oo)
    return np.nan_to_num(full), np.nan_to_num(per)


def similarity_json(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> dict[str, dict[str, float]]:
    """{paraphrased_id: {original_id: full cosine}} with candidates in BM25 order (the source's format)."""
    keys, po, pp, oo = dots.matrices()
    full, _ = cosines(po, pp, oo)
    out: dict[str, dict[str, float]] = {}
    for (p, o), value in zip(keys, full, strict=True):
        out.setdefault(p_ids[p], {})[o_ids[o]] = float(value)
    return out


def dots_json(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> dict:
    """The dot products as JSON: tensor sizes, BM25 candidates, and the source's three dicts."""
    names = list(dots.tensors)

    def named(values: np.ndarray) -> dict[str, float]:
        return {n: float(v) for n, v in zip(names, values, strict=True)}

    return {
        "tensors": dots.tensors,
        "candidates": {p_ids[p]: [o_ids[o] for o in c] for p, c in dots.candidates.items()},
        "dot_products": {p_ids[p]: {o_ids[o]: named(dots.pairs[(p, o)][0]) for o in c} for p, c in dots.candidates.items()},
        "paraphrased_dot_products": {p_ids[p]: named(v) for p, v in dots.paraphrased.items()},
        "original_dot_products": {o_ids[o]: named(v) for o, v in sorted(dots.original.items())},
    }


def merge(parts: list[dict]) -> dict:
    """Merge JSON results of partitions (dots_json or similarity JSON) into the single run's result.
    Overlapping paraphrased ids, or dot products over different tensors, are errors."""
    if not parts:
        raise UserError("nothing to merge")
    if "tensors" not in parts[0]:
        return _union(parts, "similarities")
    if any(p.get("tensors") != parts[0]["tensors"] for p in parts):
        raise UserError("cannot merge dot products over different parameter tensors (different models?)")
    merged = {"tensors": parts[0]["tensors"]}
    for key in ("candidates", "dot_products", "paraphrased_dot_products"):
        merged[key] = _union([p[key] for p in parts], key)
    originals: dict = {}
    for p in parts:  # an original seen by several partitions: its first one, as in the single run
        for o, v in p["original_dot_products"].items():
            originals.setdefault(o, v)
    merged["original_dot_products"] = dict(sorted(originals.items()))
    return merged


def _union(dicts: list[dict], what: str) -> dict:
    out: dict = {}
    for d in dicts:
        if overlap := out.keys() & d.keys():
            raise UserError(f"partitions overlap: {what} of {sorted(overlap)[:3]} appear twice; check partition_start/end")
        out.update(d)
    return out


def from_json(data: dict) -> tuple[DotProducts, list[str], list[str]]:
    """A DotProducts from dots_json output, with the paraphrased and original ids it refers to."""
    try:
        names = list(data["tensors"])
        p_ids = list(data["candidates"])
        o_ids = sorted({o for c in data["candidates"].values() for o in c} | set(data["original_dot_products"]))
        o_index = {o: i for i, o in enumerate(o_ids)}
        vec = lambda d: np.array([d[n] for n in names], dtype=np.float64)  # noqa: E731
        dots = DotProducts(dict(data["tensors"]), {i: [o_index[o] for o in data["candidates"][p]]
                                                   for i, p in enumerate(p_ids)})
        for o, v in data["original_dot_products"].items():
            dots.original[o_index[o]] = vec(v)
        for i, p in enumerate(p_ids):
            dots.paraphrased[i] = vec(data["paraphrased_dot_products"][p])
            for o in data["candidates"][p]:
                dots.pairs[(i, o_index[o])] = (vec(data["dot_products"][p][o]), dots.original[o_index[o]])
    except (KeyError, TypeError) as err:
        raise UserError(f"not a dot-products file: missing or malformed entry {err}") from None
    return dots, p_ids, o_ids


# ---------------------------------------------------------------------------------------------------------
# Samples: originals, their variants, and the recipes' shared inputs

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


def read_variants(path: str) -> list[dict]:
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
    variants: str | None = None  # make-variants output (variants.jsonl or run dir); None: rules_paraphrase of data
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


def load_pairs(cfg: PairsConfig, ctx=None) -> Pairs:
    """Originals, variants (linked by id) and each variant's BM25 candidates."""
    originals = single_turn(data.load_rows(cfg.data, ctx))
    if not originals:
        raise UserError(f"{cfg.data.name}: no single-turn [user, assistant] rows")
    variants = read_variants(cfg.variants) if cfg.variants else rules_variants(originals)
    if cfg.variants and ctx is not None:
        ctx.record_input("datasets", cfg.variants, source="variants", rows=len(variants))
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

    from llmrepro import gradients
    from llmrepro.models import load_model, load_tokenizer

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
        examples = [encoded.setdefault((kind, i), gradients.encode(rows[i], "chat", tokenizer, "sft", cfg.max_length))
                    for i in idx]
        g = gradients.per_sample_grads(model, gradients.collate(examples, tokenizer.pad_token_id), "sft")
        g = {n: t.reshape(len(idx), -1) for n, t in g.items()}
        return project(g) if project else g

    return stream_dot_products(grads, pairs.candidates, chunk_size=cfg.chunk_size, batch_size=cfg.batch_size,
                               start=cfg.partition_start, end=cfg.partition_end, progress=ctx.progress)


def truth_positions(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> np.ndarray:
    """(n_p,) slot of each paraphrased sample's own original (same id) among its candidates, -1 if absent."""
    return np.array([next((j for j, o in enumerate(c) if o_ids[o] == p_ids[p]), -1)
                     for p, c in dots.candidates.items()])


def top1_accuracy(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """scores (n_p * k, ...) grouped by paraphrased sample in candidate order -> accuracy (...) of the top-1
    (first maximum, so ties go to the better BM25 rank) being the true original; samples whose original is
    not a candidate are left out."""
    grouped = scores.reshape(len(truth), -1, *scores.shape[1:])
    hit = grouped.argmax(axis=1) == truth.reshape(-1, *[1] * (scores.ndim - 1))
    return hit[truth >= 0].mean(axis=0)


def summary(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> dict[str, float]:
    """Sample and pair counts, top-1 accuracy of the full-gradient cosine and of BM25 (its first candidate)."""
    keys, po, pp, oo = dots.matrices()
    full, _ = cosines(po, pp, oo)
    truth = truth_positions(dots, p_ids, o_ids)
    return {"samples": len(dots.candidates), "pairs": len(keys), "accuracy": float(top1_accuracy(full, truth)),
            "bm25_accuracy": float((truth[truth >= 0] == 0).mean())}
