"""gradient-similarity: cosine of each variant's gradient with those of its BM25 candidate originals.

Reproduces the gradient-similarity project's `main.py` computations (lukas-hinterleitner/master-thesis @
e6ebdbe, `src/computation.py`: `__calculate_flattened_similarities` and, with `projection`,
`__calculate_random_projected_similarities`):
- the 988 LIMA rows of the Tulu v2 mixture (`dataset == "lima"`, exactly two messages) as originals, the
  published paraphrased or model-generated variants (read by column, joined on id) as queries;
- prompt-masked SFT loss with open-instruct's tulu template forced, no truncation, float32, eval mode;
- top 5 BM25 candidates (`rank_bm25.BM25Okapi` over whitespace-split first messages), the true original
  forced into the last slot; cosine of the full flattened gradients;
- with `projection`: each tensor's gradient projected on its own (traker's CUDA projector, Rademacher,
  float16 input) to its share of 1% and 5% of the parameter count (max(512, share rounded to 512) per
  tensor), the cosine of the concatenated projections.
Output `similarities.json`: `{variant_id: {original_id: cosine}}`, candidates in BM25 order, and with
projection that object under each nominal dimension (`{"11767808": {...}, "58838016": {...}}`), the layout
of the source's `sample_size_full.json` files. Metrics: top-1 accuracy of the cosine and of BM25, the mean
and median highest cosine (the notebook's "mean similarity"), per projection with a `_<n>pct` suffix.

Deliberate differences from the source:
- gradients are streamed (`llmrepro.gradients.dot_products`): each chunk of variants and its candidates
  are differentiated in vmap batches and reduced to per-tensor dot products at once, instead of 1 + 5
  backward passes per variant, one sample at a time, with every candidate recomputed; the full cosine is
  the sum of per-tensor dot products over the square roots of summed norms (the source took
  `CosineSimilarity` of the concatenated float32 vectors: equal to ~1e-7);
- both projection dimensions come from one gradient computation (the source recomputed all gradients per
  dimension);
- attention is `eager` (vmap cannot batch SDPA; the source used the default SDPA) and passed as an additive
  mask: the same function, different rounding;
- projection seeds are `42 + crc32(name) % 10000` instead of `42 + hash(name) % 10000`: Python's string
  hash is salted per process, so the source's 50 partition jobs each used other matrices, which cannot be
  regenerated; ours are the same in every process (the matrices still differ from the source's);
- BM25 ties follow numpy's default sort as in the source, but the order of tied documents depends on the
  numpy version and CPU (`bm25_ties: stable` makes it the corpus order);
- the tulu template is forced, as the source's code from e351692 on; the runs behind the published
  paraphrased files (b901523, c550528) set it only when the tokenizer had no template of its own
  (`chat_template: model` uses the tokenizer's own);
- options the source did not have: `chat_template: model`, `max_length`, `projection.dims: exact`,
  `projection.input_dtype: float32`, `projection.projector: basic`; `method: hooks` (per-sample gradients
  built from each layer's inputs and output gradients captured in one batched backward, `gradients.capture`)
  and `method: ghost` (full gradients only: linear layers' dot products from those factors,
  `gradients.ghost`; recorded as `ghost_layers` / `ghost_max_tokens`); `projection.projector: factored`, the
  LoGra-style Kronecker projection R^T G C of each weight from its factors (`gradients.factored`, another
  projection than the source's dense one: the `*-factored` experiments; metric `factored_tensors_<n>pct`).
"""

from __future__ import annotations

from pydantic import model_validator

from llmrepro.core import io
from llmrepro.gradients import pairs as pairs_
from llmrepro.gradients import similarity
from llmrepro.gradients.pairs import PairsConfig, ProjectionConfig

__all__ = ["Config", "ProjectionConfig", "run"]


class Config(PairsConfig):
    projection: ProjectionConfig | None = None  # None: full gradients

    @model_validator(mode="after")
    def _method(self):
        if self.projection is not None and self.method == "ghost":
            raise ValueError("method ghost gives dot products of full gradients, not of projections; use method "
                             "hooks (or vmap) with projection")
        return self


def run(cfg: Config, ctx) -> dict:
    import time

    from llmrepro.training import memory

    pairs = pairs_.load_pairs(cfg, ctx)
    memory.reset_peak()
    started = time.perf_counter()
    dots, totals = pairs_.compute_dot_products(cfg, pairs, ctx, cfg.projection)
    seconds = time.perf_counter() - started
    timing = {"samples_per_s": len(dots.candidates) / seconds, "peak_memory_mb": memory.peak_mb()}
    if cfg.projection is None:
        io.write_json(ctx.dir / "similarities.json", similarity.similarity_json(dots, pairs.p_ids, pairs.o_ids))
        return {**similarity.summary(dots, pairs.p_ids, pairs.o_ids), "dims": int(sum(dots.tensors.values())),
                **pairs_.method_metrics(cfg, dots), **timing}

    out, metrics = {}, {}
    for label, total in totals.items():
        part = dots.part(label)
        out[str(total)] = similarity.similarity_json(part, pairs.p_ids, pairs.o_ids)
        s = similarity.summary(part, pairs.p_ids, pairs.o_ids)
        metrics |= {"samples": s["samples"], "pairs": s["pairs"], "bm25_accuracy": s["bm25_accuracy"]}
        metrics |= {f"accuracy_{label}": s["accuracy"], f"mean_max_cosine_{label}": s["mean_max_cosine"],
                    f"median_max_cosine_{label}": s["median_max_cosine"], f"dims_{label}": total,
                    f"dims_used_{label}": int(sum(part.tensors.values()))}
        if cfg.projection.projector == "factored":
            metrics[f"factored_tensors_{label}"] = sum(m == "factored" for m in part.methods.values())
    io.write_json(ctx.dir / "similarities.json", dict(sorted(out.items())))  # the source sorted the keys as text
    return {**metrics, **timing}
