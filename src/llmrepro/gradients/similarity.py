"""Similarities from per-tensor dot products: cosines, top-1 accuracy among the candidates, the JSON files
the source wrote (and their merge over partitions), and the grouping of tensors into components.

    per-tensor cosine = D_po / sqrt(D_pp D_oo),   full cosine = sum D_po / sqrt(sum D_pp sum D_oo)."""

from __future__ import annotations

import numpy as np

from llmrepro.core.errors import UserError
from llmrepro.gradients.dot_products import DotProducts

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


def score_matrix(test, train, method: str):
    """(M, D), (N, D) gradient tensors -> (M, N) dot products or cosines, in float32."""
    import torch.nn.functional as F

    test, train = test.float(), train.float()
    if method == "cosine":
        test, train = F.normalize(test, dim=-1), F.normalize(train, dim=-1)
    return test @ train.T
