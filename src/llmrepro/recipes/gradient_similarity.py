"""gradient-similarity: cosine of each paraphrased sample's gradient with those of its BM25 candidate originals.

Reproduces the gradient-similarity project's `gradient_similarities_*` scripts: prompt-masked SFT loss
(response only, Tulu template), model in eval mode, seed 42, top 5 BM25 candidates over the first message
with the true original forced into the last slot, cosine of the full flattened gradients; optionally after
random projection, each tensor to a share of 1% or 5% of the parameter count (rounded to 512), in
proportion to its size. Output `similarities.json`: `{paraphrased_id: {original_id: cosine}}`, candidates in
BM25 order (the source's format), plus the top-1 accuracy of the cosine and of BM25.

Deliberate differences: gradients are streamed (see `llmrepro.gradients.dot_products`), not recomputed one sample at a
time; per-tensor projection seeds come from crc32 of the tensor name instead of Python's salted `hash()`
(which made the source's projections differ per process); per-tensor dims are split so that they sum to
the requested total (the source rounded each to >= 512, overshooting it); projections are computed in
float32 (the source cast gradients to float16 for the CUDA kernel).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmrepro.core import io
from llmrepro.core.config import Strict
from llmrepro.gradients import pairs as pairs_
from llmrepro.gradients import similarity
from llmrepro.gradients.pairs import PairsConfig


class ProjectionConfig(Strict):
    fraction: float = Field(0.01, gt=0, le=1)  # of the parameter count; the source ran 0.01 and 0.05
    type: Literal["rademacher", "normal"] = "rademacher"
    projector: Literal["basic", "cuda"] = "basic"  # cuda: traker's fast_jl kernel (per-tensor dims in 512s)
    max_matrix_mb: int = Field(1024, ge=1)  # basic: memory for one block of a tensor's random matrix

    def spec(self, dim: int, seed: int):
        """The `llmrepro.projection` section for a total of `dim` dims (split over tensors later)."""
        from llmrepro.gradients.projection import Projection

        return Projection(dim=dim, type=self.type, projector=self.projector, seed=seed,
                          max_matrix_mb=self.max_matrix_mb)


class Config(PairsConfig):
    projection: ProjectionConfig | None = None  # None: full gradients


def run(cfg: Config, ctx) -> dict:
    import time

    from llmrepro.training import memory

    pairs = pairs_.load_pairs(cfg, ctx)
    memory.reset_peak()
    started = time.perf_counter()
    dots = pairs_.compute_dot_products(cfg, pairs, ctx, cfg.projection)
    seconds = time.perf_counter() - started
    io.write_json(ctx.dir / "similarities.json", similarity.similarity_json(dots, pairs.p_ids, pairs.o_ids))

    return {**similarity.summary(dots, pairs.p_ids, pairs.o_ids), "dims": int(sum(dots.tensors.values())),
            "samples_per_s": len(dots.candidates) / seconds, "peak_memory_mb": memory.peak_mb()}
