"""BM25 candidates: for each variant (paraphrased or model-generated sample), the originals whose first
message matches its first message best, as the gradient-similarity source chose them
(`src/computation.py` @ e6ebdbe, `build_bm25_index` and `select_top_bm25_matches`):

- `rank_bm25.BM25Okapi` with its defaults (k1 1.5, b 0.75, epsilon 0.25: a term found in more than half of
  the documents gets IDF 0.25 x the mean IDF instead of a negative one), float64 scores;
- documents and queries split on whitespace (`str.split()`: case and punctuation kept);
- the top k by `np.argsort(-scores)` (numpy's default sort, which is not stable: tied documents come out
  in an order numpy chooses; `ties="stable"` orders them by corpus position instead);
- the true original (same id) overwrites the last slot when it is not among them.
"""

from __future__ import annotations

from typing import Literal

from llmrepro.core.errors import UserError

TOP_K = 5
Ties = Literal["argsort", "stable"]


def first_message(row: dict) -> str:
    return row["messages"][0]["content"]


def bm25_candidates(queries: list[str], corpus: list[str], truth: list[int | None], k: int = TOP_K,
                    ties: Ties = "argsort") -> list[list[int]]:
    """Indices into `corpus` of the top-k BM25 matches of each query, best first; the true original
    `truth[i]` (None: it has none) replaces the last slot when it is not among them."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    if k > len(corpus):
        raise UserError(f"top_k={k} is larger than the {len(corpus)} originals")
    index = BM25Okapi([doc.split() for doc in corpus])
    kind = "stable" if ties == "stable" else None  # None: numpy's default (quicksort), as the source
    out = []
    for query, true in zip(queries, truth, strict=True):
        scores = index.get_scores(query.split())  # (len(corpus),) float64
        top = [int(i) for i in np.argsort(-scores, kind=kind)[:k]]
        if true is not None and true not in top:
            top[-1] = true
        out.append(top)
    return out
