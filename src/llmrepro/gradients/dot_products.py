"""Per-tensor gradient dot products of variants with their candidate originals, streamed.

For every pair (p, o) and every parameter tensor t we accumulate D_po[t] = <g_p[t], g_o[t]>, D_pp[t] and
D_oo[t]. Variants are processed in chunks of `chunk_size`; a chunk's per-sample gradients are held while
its candidates' gradients are produced `batch_size` at a time, and per-tensor dot products are taken as
matrix products. Memory is (chunk_size + batch_size) gradient buffers whatever the sample count; the price
is that an original shared by several chunks has its gradient computed once per chunk, which chunks
grouped by shared candidates (`plan_chunks`) keep low. (The source computed 1 + k gradients per variant,
recomputing every candidate each time it appeared.)

What a "tensor" holds is up to the caller: `grads(kind, indices)` returns {name: (B, n)} features whose
dot products are wanted, and `cross` / `norms` turn them into per-tensor dot products; the defaults treat
them as materialized (flattened) gradients, or their projections (`TensorProjector`, `ProjectionSet`).

Partitions: the chunk plan is fixed by the whole candidate list, and a partition [start, end) runs exactly
the chunks that hold its samples, so every number it reports was computed the same way as in the single
run: merging partitions gives the single run's result exactly.

Projection (the source's `__project_gradients_layerwise`, `src/computation.py` @ e6ebdbe): each tensor's
gradient is projected on its own with a traker projector, to a dimension proportional to its size, with a
seed derived from the tensor name; the cosine is taken over the concatenated projections (= summed
per-tensor dot products). `dims: source` splits the total as the source did (every tensor
max(512, its share rounded to a multiple of 512): the parts overshoot the nominal total), `exact` by
largest remainder so that they sum to it. Seeds are `seed + crc32(name) % 10000` (the source used Python's
salted `hash()`, which changes between processes, so its matrices cannot be regenerated).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llmrepro.core.errors import UserError
from llmrepro.gradients.projection import CUDA_DIM_MULTIPLE, Projection, Projector, ProjectorKind

if TYPE_CHECKING:
    import numpy as np
    import torch

PROJECTION_MULTIPLE = 512
DimsRule = Literal["source", "exact"]


def projection_total(num_params: int, fraction: float) -> int:
    """The nominal projection dimension for `fraction` of the parameters, as the source computed it
    (`__projection_dimensions`): int(N * fraction), rounded (Python's round) to a multiple of 512."""
    total = round(int(num_params * fraction) / PROJECTION_MULTIPLE) * PROJECTION_MULTIPLE
    if total == 0:
        raise UserError(f"projection fraction {fraction} of {num_params} parameters rounds to 0 dimensions "
                        f"(multiples of {PROJECTION_MULTIPLE}); use a larger fraction")
    return total


def split_dims(sizes: dict[str, int], total: int, multiple: int = 1, rule: DimsRule = "exact") -> dict[str, int]:
    """`total` split over tensors in proportion to their sizes.

    `source`: every tensor gets max(512, 512 * round(size / N * total / 512)), the source's
    `__calculate_layer_projection_dimensions` (the parts overshoot `total`, small tensors get 512).
    `exact`: in units of `multiple` (512 for the CUDA projector), by largest remainder, so the parts sum to
    `total`; tensors whose share rounds to 0 are left out."""
    n = sum(sizes.values())
    if rule == "source":
        return {name: max(PROJECTION_MULTIPLE, PROJECTION_MULTIPLE * round(size / n * total / PROJECTION_MULTIPLE))
                for name, size in sizes.items()}
    units = total // multiple
    if total > n:
        raise UserError(f"projection dimension {total} exceeds the {n} parameters")
    exact = {name: units * size / n for name, size in sizes.items()}
    dims = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (dims[name] - exact[name], name))
    for name in by_remainder[: units - sum(dims.values())]:
        dims[name] += 1
    return {name: d * multiple for name, d in dims.items() if d > 0}


def tensor_seed(name: str, seed: int) -> int:
    """Per-tensor projection seed in the source's range (seed + hash(name) % 10000), with crc32 for the
    hash so that it is the same in every process."""
    return seed + zlib.crc32(name.encode()) % 10000


class TensorProjector:
    """Projects each tensor's flattened per-sample gradients (B, n_t) on its own, with its share of
    `spec.dim` and its own seed, through `llmrepro.gradients.projection` (traker's basic or CUDA projector).

    `input_dtype: float16` rounds the gradients to float16 first, as the source did (`.half()` before the
    CUDA kernel, which then accumulates in float32); the basic projector gets the rounded values in float32."""

    def __init__(self, sizes: dict[str, int], spec: Projection, device="cpu", dims: DimsRule = "exact",
                 input_dtype: Literal["float16", "float32"] = "float32"):
        multiple = CUDA_DIM_MULTIPLE if spec.projector == ProjectorKind.cuda else 1
        self.dims = split_dims(sizes, spec.dim, multiple, dims)
        self.input_dtype = input_dtype
        self.cuda = spec.projector == ProjectorKind.cuda
        self.projectors = {name: Projector(spec.model_copy(update={"dim": dim, "seed": tensor_seed(name, spec.seed)}),
                                           sizes[name], device)
                           for name, dim in self.dims.items()}

    def _input(self, g: torch.Tensor) -> torch.Tensor:
        if self.input_dtype == "float32":
            return g
        return g.half() if self.cuda else g.half().float()

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: proj.project(self._input(grads[name])).float() for name, proj in self.projectors.items()}


class ProjectionSet:
    """Several projections of the same gradients (the source's 1% and 5%), as one dict of tensors keyed
    `<label>/<tensor name>`, so that one stream of gradients feeds all of them; `DotProducts.part(label)`
    takes one back out."""

    def __init__(self, projectors: dict[str, TensorProjector]):
        self.projectors = projectors

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{label}/{name}": g for label, proj in self.projectors.items() for name, g in proj(grads).items()}


GradFn = Callable[[str, list[int]], dict[str, "torch.Tensor"]]  # ('p'|'o', indices) -> name -> (B, n)


def materialized_cross(P: dict[str, torch.Tensor], Q: dict[str, torch.Tensor], needed=None) -> dict[str, torch.Tensor]:
    """{name: (c, n)}, {name: (b, n)} -> {name: (c, b)} dot products of every row of P with every row of Q.
    `needed` ((c, b) bool, the pairs that are read) lets a costlier `cross` skip the others; one matrix
    product computes them all anyway."""
    return {n: P[n] @ Q[n].T for n in P}


def materialized_norms(P: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (c, n)} -> {name: (c,)} squared norms."""
    return {n: (g * g).sum(1) for n, g in P.items()}


def plan_chunks(candidates: list[list[int]], chunk_size: int) -> list[tuple[list[int], list[int]]]:
    """(variant indices, sorted union of their candidate originals) per chunk of the whole run.

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
    methods: dict[str, str] = field(default_factory=dict)  # tensor -> how it was computed (vmap, ghost, factored ...)
    max_tokens: int | None = None  # the longest sample, where the ghost rule used it

    def matrices(self) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
        """(pairs in order, D_po, D_pp, D_oo), each (n_pairs, n_tensors)."""
        import numpy as np

        keys = [(p, o) for p, cands in self.candidates.items() for o in cands]
        po = np.stack([self.pairs[k][0] for k in keys])
        pp = np.stack([self.paraphrased[p] for p, _ in keys])
        oo = np.stack([self.pairs[k][1] for k in keys])
        return keys, po, pp, oo

    def unlabelled(self) -> DotProducts:
        """The tensors without a `<label>/` prefix: the full-gradient ones of a run that also projected."""
        cols = [i for i, n in enumerate(self.tensors) if "/" not in n]
        pick = lambda v: v[cols]  # noqa: E731
        return DotProducts({n: d for n, d in self.tensors.items() if "/" not in n}, dict(self.candidates),
                           {k: (pick(a), pick(b)) for k, (a, b) in self.pairs.items()},
                           {k: pick(v) for k, v in self.paraphrased.items()},
                           {k: pick(v) for k, v in self.original.items()},
                           {n: m for n, m in self.methods.items() if "/" not in n}, self.max_tokens)

    def part(self, label: str) -> DotProducts:
        """The tensors named `<label>/...` (a `ProjectionSet` projection), with the label taken off."""
        cols = [i for i, n in enumerate(self.tensors) if n.startswith(f"{label}/")]
        if not cols:
            raise KeyError(label)
        pick = lambda v: v[cols]  # noqa: E731
        return DotProducts({n.split("/", 1)[1]: d for n, d in self.tensors.items() if n.startswith(f"{label}/")},
                           dict(self.candidates),
                           {k: (pick(a), pick(b)) for k, (a, b) in self.pairs.items()},
                           {k: pick(v) for k, v in self.paraphrased.items()},
                           {k: pick(v) for k, v in self.original.items()},
                           {n.split("/", 1)[1]: m for n, m in self.methods.items() if n.startswith(f"{label}/")},
                           self.max_tokens)


def stream_dot_products(grads: GradFn, candidates: list[list[int]], *, chunk_size: int, batch_size: int,
                        start: int = 0, end: int | None = None, progress=lambda it, **_: it,
                        cross=materialized_cross, norms=materialized_norms,
                        tensors: dict[str, int] | None = None) -> DotProducts:
    """Dot products of variants [start, end) with their candidates, holding at most chunk_size + batch_size
    per-sample gradients at a time. `cross` and `norms` compute per-tensor dot products from what `grads`
    returns (default: materialized gradients); `tensors` names their sizes (default: the feature widths).

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
            out = DotProducts(dict(tensors) if tensors else {n: g[0].numel() for n, g in P.items()}, {})
        names = list(out.tensors)
        sq = norms(P)
        pp = torch.stack([sq[n] for n in names], 1).double().cpu().numpy()  # (c, T)
        for i in keep:
            out.paraphrased[ps[i]] = pp[i]
            out.candidates[ps[i]] = list(candidates[ps[i]])
        for b in range(0, len(os), batch_size):
            batch = os[b:b + batch_size]
            Q = grads("o", batch)  # the candidates' gradients
            needed = torch.tensor([[i in keep and o in candidates[p] for o in batch] for i, p in enumerate(ps)])
            dots = cross(P, Q, needed)  # (c, b) per tensor; only the `needed` entries are read
            po = torch.stack([dots[n] for n in names], 2).double().cpu().numpy()  # (c, b, T)
            sq = norms(Q)
            oo = torch.stack([sq[n] for n in names], 1).double().cpu().numpy()  # (b, T)
            for j, o in enumerate(batch):
                pairs = [i for i in keep if o in candidates[ps[i]]]
                if pairs:
                    out.original.setdefault(o, oo[j])
                for i in pairs:
                    out.pairs[(ps[i], o)] = (po[i, j], oo[j])
            del Q, dots
        del P
    if out is None:
        raise UserError(f"partition [{start}, {end}) holds no samples (there are {len(candidates)})")
    return out
