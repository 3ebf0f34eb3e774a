"""layer-dot-products: per parameter tensor, the dot products p.o, p.p and o.o of variants and their BM25
candidate originals, from which layer-analysis derives per-layer and full cosines.

Reproduces the gradient-similarity project's dot-product computation (lukas-hinterleitner/master-thesis @
e6ebdbe, `src/computation.py` `__calculate_layerwise_dot_products`): same originals, variants, candidates,
tokenisation and loss as gradient-similarity. Output `dot_products.json`: the source's three dicts under
`dot_products` (`{p: {o: {tensor: p.o}}}`), `paraphrased_dot_products` (`{p: {tensor: p.p}}`) and
`original_dot_products` (`{o: {tensor: o.o}}`), plus `tensors` (parameter counts) and `candidates` (BM25
order). Partition outputs merge with `llmrepro.gradients.similarity.merge`, or are read together by
layer-analysis. Metrics as gradient-similarity's (accuracy of the full cosine and of BM25).

Deliberate differences from the source:
- streamed (see `llmrepro.gradients.dot_products`) instead of recomputing every candidate's gradient one
  sample at a time; dot products are float32 matrix products accumulated per tensor and stored as float64
  (the source: `.item()` of a float32 GPU dot per tensor and pair);
- `original_dot_products` holds each original's first computed value, in original order (the source kept
  the first one per job and, merging 20 partition files, the last file's in glob order); the pairs keep the
  o.o computed next to them;
- eager attention (vmap), the tulu template forced, BM25 tie order: as gradient-similarity (the published
  paraphrased dot products, d2bb4d7, set the template only when the tokenizer had none).
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
    dots, _ = pairs_.compute_dot_products(cfg, pairs, ctx)
    seconds = time.perf_counter() - started
    io.write_json(ctx.dir / "dot_products.json", similarity.dots_json(dots, pairs.p_ids, pairs.o_ids))

    return {**similarity.summary(dots, pairs.p_ids, pairs.o_ids), "tensors": len(dots.tensors),
            "samples_per_s": len(dots.candidates) / seconds, "peak_memory_mb": memory.peak_mb()}
