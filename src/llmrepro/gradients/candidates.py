"""BM25 candidates: for each paraphrased sample, the originals whose first message matches it best."""

from __future__ import annotations

import numpy as np

from llmrepro.core.errors import UserError

TOP_K = 5

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
