"""layer-dot-products: per parameter tensor, the dot products p.o, p.p and o.o of paraphrased samples and
their BM25 candidate originals, from which layer-analysis derives per-layer and full cosines.

Reproduces the gradient-similarity project's `dot_products_*` scripts (same loss, model mode, candidates
as gradient-similarity). Output `dot_products.json`: the source's three dicts under `dot_products`
(`{p: {o: {tensor: p.o}}}`), `paraphrased_dot_products` and `original_dot_products` (`{id: {tensor: x.x}}`),
plus `tensors` (parameter counts) and `candidates` (BM25 order). Partition outputs merge with
`llmrepro.gradients.similarity.merge`, or are read together by layer-analysis.

Deliberate difference: streamed (see `llmrepro.gradients.dot_products`) instead of recomputing every candidate's
gradient one sample at a time.
"""

from __future__ import annotations

from llmrepro.core import io
from llmrepro.gradients import pairs as pairs_
from llmrepro.gradients import similarity
from llmrepro.gradients.pairs import PairsConfig


class Config(PairsConfig):
    pass


def run(cfg: Config, ctx) -> dict:
    import time

    from llmrepro.training import memory

    pairs = pairs_.load_pairs(cfg, ctx)
    memory.reset_peak()
    started = time.perf_counter()
    dots = pairs_.compute_dot_products(cfg, pairs, ctx)
    seconds = time.perf_counter() - started
    io.write_json(ctx.dir / "dot_products.json", similarity.dots_json(dots, pairs.p_ids, pairs.o_ids))

    return {**similarity.summary(dots, pairs.p_ids, pairs.o_ids), "tensors": len(dots.tensors),
            "samples_per_s": len(dots.candidates) / seconds, "peak_memory_mb": memory.peak_mb()}
