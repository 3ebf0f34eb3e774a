"""Per-tensor gradient dot products of paraphrased samples with their candidate originals, streamed.

For every pair (p, o) and every parameter tensor t we accumulate D_po[t] = <g_p[t], g_o[t]>, D_pp[t] and
D_oo[t]. Paraphrased samples are processed in chunks of `chunk_size`; a chunk's per-sample gradients are
held while its candidates' gradients are produced `batch_size` at a time, and per-tensor dot products are
taken as matrix products. Memory is (chunk_size + batch_size) gradient buffers whatever the sample count;
the price is that an original shared by several chunks has its gradient computed once per chunk, which
chunks grouped by shared candidates (`plan_chunks`) keep low.

Partitions: the chunk plan is fixed by the whole candidate list, and a partition [start, end) runs exactly
the chunks that hold its samples, so every number it reports was computed the same way as in the single
run: merging partitions gives the single run's result exactly.

Projection (optional, `TensorProjector`): each tensor's gradient is projected on its own with a traker
projector whose seed is derived from the tensor name with crc32 (the source used Python's salted `hash()`,
which changes between processes), to a dimension proportional to its size; the dimensions sum to the total."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmrepro.core.errors import UserError
from llmrepro.gradients.projection import CUDA_DIM_MULTIPLE, Projection, Projector, ProjectorKind

PROJECTION_MULTIPLE = 512

def projection_total(num_params: int, fraction: float) -> int:
    """`fraction` of the parameter count rounded to a multiple of 512 (at least 512), as in the source."""
    return max(PROJECTION_MULTIPLE, round(num_params * fraction / PROJECTION_MULTIPLE) * PROJECTION_MULTIPLE)


def split_dims(sizes: dict[str, int], total: int, multiple: int = 1) -> dict[str, int]:
    """`total` split over tensors in proportion to their sizes, in units of `multiple` (512 for the CUDA
    projector), by largest remainder so the parts sum to `total`; tensors whose share rounds to 0 are left out."""
    n, units = sum(sizes.values()), total // multiple
    if total > n:
        raise UserError(f"projection dimension {total} exceeds the {n} parameters")
    exact = {name: units * size / n for name, size in sizes.items()}
    dims = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (dims[name] - exact[name], name))
    for name in by_remainder[: units - sum(dims.values())]:
        dims[name] += 1
    return {name: d * multiple for name, d in dims.items() if d > 0}


def tensor_seed(name: str, seed: int) -> int:
    """Per-tensor projection seed, the same in every process (crc32, not Python's salted hash())."""
    return (seed + zlib.crc32(name.encode())) % 2**31


class TensorProjector:
    """Projects each tensor's flattened per-sample gradients (B, n_t) on its own, with its share of
    `spec.dim` and its own seed, through `llmrepro.projection` (traker's basic or CUDA projector)."""

    def __init__(self, sizes: dict[str, int], spec: Projection, device="cpu"):
        multiple = CUDA_DIM_MULTIPLE if spec.projector == ProjectorKind.cuda else 1
        self.projectors = {name: Projector(spec.model_copy(update={"dim": dim, "seed": tensor_seed(name, spec.seed)}),
                                           sizes[name], device)
                           for name, dim in split_dims(sizes, spec.dim, multiple).items()}

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: F821
        return {name: proj.project(grads[name]) for name, proj in self.projectors.items()}


GradFn = Callable[[str, list[int]], dict[str, "torch.Tensor"]]  # noqa: F821  ('p'|'o', indices) -> name -> (B, n)


def plan_chunks(candidates: list[list[int]], chunk_size: int) -> list[tuple[list[int], list[int]]]:
    """(paraphrased indices, sorted union of their candidate originals) per chunk of the whole run.

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

    def matrices(self) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
        """(pairs in order, D_po, D_pp, D_oo), each (n_pairs, n_tensors)."""
        keys = [(p, o) for p, cands in self.candidates.items() for o in cands]
        po = np.stack([self.pairs[k][0] for k in keys])
        pp = np.stack([self.paraphrased[p] for p, _ in keys])
        oo = np.stack([self.pairs[k][1] for k in keys])
        return keys, po, pp, oo


def stream_dot_products(grads: GradFn, candidates: list[list[int]], *, chunk_size: int, batch_size: int,
                        start: int = 0, end: int | None = None, progress=lambda it, **_: it) -> DotProducts:
    """Dot products of paraphrased samples [start, end) with their candidates, holding at most
    chunk_size + batch_size per-sample gradients at a time.

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
            out = DotProducts({n: g[0].numel() for n, g in P.items()}, {})
        P = {n: g.reshape(len(ps), -1) for n, g in P.items()}
        pp = torch.stack([(g * g).sum(1) for g in P.values()], 1).double().numpy()  # (c, T)
        for i in keep:
            out.paraphrased[ps[i]] = pp[i]
            out.candidates[ps[i]] = list(candidates[ps[i]])
        for b in range(0, len(os), batch_size):
            batch = os[b:b + batch_size]
            Q = {n: g.reshape(len(batch), -1) for n, g in grads("o", batch).items()}  # candidates' gradients
            po = torch.stack([P[n] @ Q[n].T for n in P], 2).double().numpy()  # (c, b, T)
            oo = torch.stack([(g * g).sum(1) for g in Q.values()], 1).double().numpy()  # (b, T)
            for j, o in enumerate(batch):
                pairs = [i for i in keep if o in candidates[ps[i]]]
                if pairs:
                    out.original.setdefault(o, oo[j])
                for i in pairs:
                    out.pairs[(ps[i], o)] = (po[i, j], oo[j])
            del Q
        del P
    if out is None:
        raise UserError(f"partition [{start}, {end}) holds no samples (there are {len(candidates)})")
    return out
