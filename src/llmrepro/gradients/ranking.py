"""Influence scores of train samples for each test sample, and the rankings made from them, the source's way
or fixed (score-gradients writes them, projection-quality compares them).

    scores = score(test, train, "cosine", ranking)        # (M, N) float64: test i x train j
    orders = rank(scores, ranking, excluded)              # M lists of train indices, best first

`ranking: source` is explain.py + DAP_main_results.ipynb @ d73147d:
- scores in the gradients' stored dtype on the CPU (float16 for full gradients, float32 for projections),
  as `sum(train * test, dim=-1)`, after `F.normalize` for cosine. In float16 the products below ~6e-8
  underflow, and an all-zero gradient normalises to NaN (eps 1e-12 is 0 in float16): the source's train row
  570 (`open_orca_t0.1598436`, no labelled token in 4096) gets a NaN full-gradient cosine;
- each test sample's list sorted by Python's `list.sort(key=score, reverse=True)` in dataset order: stable,
  but a NaN key compares false both ways, and the sort then leaves the list only partly sorted;
- the excluded rows dropped from the sorted list afterwards; a train sample's rank is its list position.
So the source's full-gradient cosine rankings are not the score order (which is why its published cosine
agreement is low at every dimension). `ranking: fixed`: float32 scores, excluded rows dropped first, then
ranked by score (ties in dataset order, a NaN last).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

Ranking = Literal["source", "fixed"]
Method = Literal["dot", "cosine"]
CHUNK_ROWS = 64  # train rows per elementwise product: bounds the (rows, D) temporary


def source_scores(test: torch.Tensor, train: torch.Tensor, method: Method, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """(M, D), (N, D) -> (M, N): explain.py's arithmetic, in the stored dtype on the CPU, `chunk_rows` train rows
    at a time. The same operations; where the last bit of a float16 sum falls depends on how torch splits
    the reduction over threads, which depends on the shape and the thread count (explain.py ran on 2 CPUs),
    so only a chunk of all N rows on as many threads repeats explain.py bit for bit."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    out = np.empty((len(test), len(train)))
    tests = [test[i:i + 1].cpu() for i in range(len(test))]  # (1, D) each, as explain.py iterated them
    if method == "cosine":
        tests = [F.normalize(t, p=2, dim=-1) for t in tests]
    for s in range(0, len(train), chunk_rows):
        rows = train[s:s + chunk_rows].cpu()
        if method == "cosine":
            rows = F.normalize(rows, p=2, dim=-1)
        for i, t in enumerate(tests):
            out[i, s:s + len(rows)] = torch.sum(rows * t, dim=-1).double().numpy()
    return out


def float32_scores(test: torch.Tensor, train: torch.Tensor, method: Method, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """(M, D), (N, D) -> (M, N) dot products or cosines in float32 (a zero vector has cosine 0), `chunk_rows`
    train rows converted at a time."""
    import numpy as np
    import torch.nn.functional as F

    t = test.float()
    if method == "cosine":
        t = F.normalize(t, dim=-1)
    parts = []
    for s in range(0, len(train), chunk_rows):
        rows = train[s:s + chunk_rows].float()
        if method == "cosine":
            rows = F.normalize(rows, dim=-1)
        parts.append((t @ rows.T).double().numpy())
    return np.concatenate(parts, axis=1)


def score(test, train, method: Method, ranking: Ranking, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """(M, N) scores of `ranking`'s arithmetic: explain.py's (`source`) or float32 (`fixed`)."""
    if ranking == "source":
        return source_scores(test, train, method, chunk_rows)
    return float32_scores(test, train, method, chunk_rows)


def source_order(scores: Iterable[float]) -> list[int]:
    """Indices in the order explain.py's `list.sort(key=score, reverse=True)` leaves a list in dataset order."""
    keys = [float(s) for s in scores]
    return sorted(range(len(keys)), key=keys.__getitem__, reverse=True)


def fixed_order(scores: np.ndarray, excluded: set[int] = frozenset()) -> list[int]:
    """Indices not in `excluded` by descending score, ties in dataset order, NaN last."""
    import numpy as np

    idx = np.array([j for j in range(len(scores)) if j not in excluded], dtype=np.int64)
    values = np.asarray(scores, dtype=float)[idx]
    return idx[np.argsort(-np.where(np.isnan(values), -np.inf, values), kind="stable")].tolist()


def rank(scores: np.ndarray, ranking: Ranking, excluded: set[int] = frozenset()) -> list[list[int]]:
    """(M, N) scores -> per test sample, the train indices best first, without the excluded ones."""
    if ranking == "source":
        return [[j for j in source_order(row) if j not in excluded] for row in scores]
    return [fixed_order(row, excluded) for row in scores]
