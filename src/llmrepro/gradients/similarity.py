"""Similarities from per-tensor dot products: cosines, top-1 accuracy among the candidates, the JSON files
the source wrote (and their merge over partitions, and readers for the source's own files), and the
grouping of tensors into components.

    per-tensor cosine = D_po / sqrt(D_pp D_oo),   full cosine = sum D_po / sqrt(sum D_pp sum D_oo).

The scores are the source's (`notebooks/analysis.ipynb` @ e6ebdbe, `calculate_score`): a variant is right
when its most similar candidate (the first maximum, in BM25 order) has its id; BM25 is right when its first
candidate has. Both are fractions of all variants (one whose original is not a candidate counts as wrong).

Source file layouts read and written here (all `{id: ...}` objects keep candidates in BM25 order):
- similarities, `data/gradient_similarity/<setting>/<model>/sample_size_full.json`: `{p: {o: cosine}}`;
  projected ones nest that under the nominal dimension, `{"11767808": {p: {o: cosine}}, ...}`;
- dot products, `data/dot_products/<setting>/<model>/sample_size/full/`: `dot_products.json`
  `{p: {o: {tensor: p.o}}}`, `paraphrased_dot_products.json` `{p: {tensor: p.p}}`,
  `original_dot_products.json` `{o: {tensor: o.o}}`, or partitions `<name>_part_<a>_<b>.json` of each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from llmrepro.core import io
from llmrepro.core.errors import UserError
from llmrepro.gradients.dot_products import DotProducts

if TYPE_CHECKING:
    import numpy as np

# component -> substrings of a parameter name (first match wins), as in the source's layer analysis
COMPONENTS = {
    "embed": ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions", "lm_head", "embed_out"),
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "attn.c_proj", "out_proj", "dense."),
    "gate": ("gate_proj",), "up": ("up_proj", "c_fc", "fc1", "dense_h_to_4h"),
    "down": ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h"),
    "norms": ("norm", "ln_"),
}
ATTENTION, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
SOURCE_FILES = ("dot_products", "paraphrased_dot_products", "original_dot_products")


def component(name: str) -> str:
    """The component (embed, q, k, v, o, gate, up, down, norms) a parameter tensor belongs to, or 'other'."""
    for comp, keys in COMPONENTS.items():
        if any(k in name for k in keys):
            return comp
    return "other"


def cosines(po: np.ndarray, pp: np.ndarray, oo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full cosine per pair (n_pairs,), per-tensor cosine (n_pairs, n_tensors)); 0 where a norm is 0."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        full = po.sum(1) / np.sqrt(pp.sum(1) * oo.sum(1))
        per = po / np.sqrt(pp * oo)
    return np.nan_to_num(full), np.nan_to_num(per)


def uncentred_cosine(x: np.ndarray, y: np.ndarray, axis: int = 0, eps: float = 0.0) -> np.ndarray:
    """x.y / (|x| |y|) along `axis` (the source's `cosine_similarity` of two similarity vectors: no centring,
    unlike Pearson); `eps` is added to each norm (the source's greedy selection adds 1e-12)."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return (x * y).sum(axis) / ((np.linalg.norm(x, axis=axis) + eps) * (np.linalg.norm(y, axis=axis) + eps))


def truth_positions(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> np.ndarray:
    """(n_p,) slot of each variant's own original (same id) among its candidates, -1 if absent."""
    import numpy as np

    return np.array([next((j for j, o in enumerate(c) if o_ids[o] == p_ids[p]), -1)
                     for p, c in dots.candidates.items()])


def top1_accuracy(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """scores (n_p * k, ...) grouped by variant in candidate order -> accuracy (...) of the top-1 (first
    maximum, so ties go to the better BM25 rank) being the true original, over all variants."""
    grouped = scores.reshape(len(truth), -1, *scores.shape[1:])
    hit = grouped.argmax(axis=1) == truth.reshape(-1, *[1] * (scores.ndim - 1))
    return hit.mean(axis=0)


def max_cosine_stats(full: np.ndarray, n_p: int) -> tuple[float, float]:
    """(mean, median) over variants of the highest candidate cosine (the notebook's "mean similarity")."""
    import numpy as np

    best = full.reshape(n_p, -1).max(axis=1)
    return float(best.mean()), float(np.median(best))


def summary(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> dict[str, float]:
    """Sample and pair counts, top-1 accuracy of the full-gradient cosine and of BM25 (its first candidate),
    and the mean and median highest cosine."""
    keys, po, pp, oo = dots.matrices()
    full, _ = cosines(po, pp, oo)
    truth = truth_positions(dots, p_ids, o_ids)
    mean, median = max_cosine_stats(full, len(truth))
    return {"samples": len(dots.candidates), "pairs": len(keys), "accuracy": float(top1_accuracy(full, truth)),
            "bm25_accuracy": float((truth == 0).mean()), "mean_max_cosine": mean, "median_max_cosine": median}


def wrong_decisions(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> list[str]:
    """Ids of the variants whose most similar candidate (full gradient) is not their original."""
    keys, po, pp, oo = dots.matrices()
    full, _ = cosines(po, pp, oo)
    truth = truth_positions(dots, p_ids, o_ids)
    best = full.reshape(len(truth), -1).argmax(axis=1)
    return [p_ids[p] for p, b, t in zip(dots.candidates, best, truth, strict=True) if b != t]


# ------------------------------------------------------------------------------------------ our JSON files

def similarity_json(dots: DotProducts, p_ids: list[str], o_ids: list[str]) -> dict[str, dict[str, float]]:
    """{variant_id: {original_id: full cosine}} with candidates in BM25 order (the source's format)."""
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


def is_projected(data: dict) -> bool:
    """Whether a similarities JSON nests `{p: {o: cos}}` under projection dimensions (the source's layout)."""
    return bool(data) and all(str(k).isdigit() for k in data)


def merge(parts: list[dict]) -> dict:
    """Merge JSON results of partitions (dots_json, similarity JSON, projected similarity JSON) into the single
    run's result. Overlapping variant ids, or dot products over different tensors, are errors."""
    if not parts:
        raise UserError("nothing to merge")
    if "tensors" not in parts[0]:
        if is_projected(parts[0]):
            if any(set(p) != set(parts[0]) for p in parts):
                raise UserError("cannot merge similarities projected to different dimensions")
            return {dim: _union([p[dim] for p in parts], f"similarities ({dim} dims)") for dim in sorted(parts[0])}
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
    """A DotProducts from dots_json output, with the variant and original ids it refers to."""
    import numpy as np

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


# ------------------------------------------------------------------------------------ the source's files

def _part_key(path: Path) -> tuple[int, str]:
    m = re.search(r"_part_(\d+)_(\d+)\.json$", path.name)
    return (int(m.group(1)) if m else -1, path.name)


def source_dot_product_files(paths: list[str | Path]) -> dict[str, list[Path]]:
    """The source's dot-product files under `paths` (directories, or the files themselves): for each of its
    three names, the whole file or its partitions in partition order."""
    found: dict[str, list[Path]] = {name: [] for name in SOURCE_FILES}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"source dot products: {path} does not exist")
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            name = re.sub(r"_part_\d+_\d+$", "", f.stem)
            if name in found and f not in found[name]:
                found[name].append(f)
    for name, files in found.items():
        if not files:
            raise UserError(f"source dot products: no {name}.json (or {name}_part_<a>_<b>.json) under "
                            f"{', '.join(str(p) for p in paths)}")
        files.sort(key=_part_key)
    return found


def read_source_dot_products(paths: list[str | Path], sizes: dict[str, int]) -> tuple[DotProducts, list[str], list[str]]:
    """A DotProducts from the source's three dot-product files (or their partitions, merged: an original
    met by several partitions keeps its first one), with the variant and original ids.

    `sizes`: parameters per tensor (the source's `results/parameters_per_layer/<model>/values.json`); the
    tensors are taken in its order and must all be present. Each pair's D_oo is the original's one value,
    as the source's notebook used it."""
    import numpy as np

    files = source_dot_product_files(paths)
    loaded = {}
    for name, parts in files.items():
        merged: dict = {}
        for f in parts:
            data = io.read_user_json(f, "not a JSON file")
            if not isinstance(data, dict):
                raise UserError(f"{f}: expected an object of ids")
            if name == "original_dot_products":
                for k, v in data.items():
                    merged.setdefault(k, v)
            elif overlap := merged.keys() & data.keys():
                raise UserError(f"{f}: ids {sorted(overlap)[:3]} are in an earlier partition too")
            else:
                merged.update(data)
        loaded[name] = merged
    cross, para, orig = (loaded[n] for n in SOURCE_FILES)
    names = list(sizes)
    p_ids = sorted(cross, key=_id_order)
    o_ids = sorted({o for c in cross.values() for o in c} | set(orig), key=_id_order)
    o_index = {o: i for i, o in enumerate(o_ids)}
    try:
        vec = lambda d: np.array([d[n] for n in names], dtype=np.float64)  # noqa: E731
        dots = DotProducts(dict(sizes), {i: [o_index[o] for o in cross[p]] for i, p in enumerate(p_ids)})
        for o, v in orig.items():
            dots.original[o_index[o]] = vec(v)
        for i, p in enumerate(p_ids):
            dots.paraphrased[i] = vec(para[p])
            for o in cross[p]:
                dots.pairs[(i, o_index[o])] = (vec(cross[p][o]), dots.original[o_index[o]])
    except KeyError as err:
        raise UserError(f"source dot products: no entry for {err} (the files do not cover each other, or "
                        "the parameter list names other tensors)") from None
    return dots, p_ids, o_ids


def _id_order(sample_id: str) -> tuple:
    """Ids in the source's order: by the number after the last '_' (`src/utility.py` sorts numerically)."""
    head, _, tail = sample_id.rpartition("_")
    return (head, int(tail), "") if tail.isdigit() else (sample_id, -1, sample_id)


def read_similarities(path: str | Path) -> dict:
    """A similarities JSON (ours or the source's `sample_size_full.json`), checked: `{p: {o: float}}`, or that
    nested under projection dimensions."""
    p = Path(path).expanduser()
    data = io.read_user_json(p, "not a similarities file")
    groups = data.values() if is_projected(data) else [data]
    for group in groups:
        if not isinstance(group, dict) or not all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
                                                  for v in group.values()):
            raise UserError(f"{p}: expected {{variant id: {{original id: cosine}}}} (optionally under dimensions)")
    return data


def score_matrix(test, train, method: str):
    """(M, D), (N, D) gradient tensors -> (M, N) dot products or cosines, in float32."""
    import torch.nn.functional as F

    test, train = test.float(), train.float()
    if method == "cosine":
        test, train = F.normalize(test, dim=-1), F.normalize(train, dim=-1)
    return test @ train.T
