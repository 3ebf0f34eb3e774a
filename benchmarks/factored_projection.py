"""Benchmark: factored (LoGra-style) against dense per-tensor random projection of per-sample gradients, at equal
total dimension, on the same captured gradients, in one process:

    python benchmarks/factored_projection.py [--samples 32] [--fraction 0.01] [--batch-size 8] [--max-matrix-mb 256]

Model: tiny-llama scaled to ~10M parameters (hidden 384, 6 layers, MLP 1024), float32, eval mode, CPU (one torch
thread; times are process CPU seconds, which other load on a shared machine does not inflate). Data: `--samples`
synthetic LIMA-like chat rows of at least 128 tokens and their rule-based paraphrases (the gradient-similarity
setting); every paraphrase is scored against every original by the cosine of the two gradients, and is right
when its own original scores highest (top-1 accuracy over all originals, harder than 5 BM25 candidates).

Each tensor gets its share of `--fraction` of the parameters (`split_dims`, exact), the factored projection
splits it as k_r x k_c (`factored.factor_dims`), and the dense projection gets exactly that k_r * k_c for the
same tensor (equal total dimension, `dims_used`). What is timed, after one common step (not in the ratio,
printed):
- capture: one batched forward + backward per batch of `--batch-size`, keeping each layer's inputs and output
  gradients (`gradients.capture`); both projections start from it;
- dense: per tensor, one tensor at a time, the per-sample gradients built from the factors and projected with
  traker's BasicProjector (rademacher, per-tensor seed, blocks of `--max-matrix-mb`), all samples in one call per
  tensor (its matrix generated once, block by block: the dense projection's best case; `TensorProjector` per
  batch regenerates large matrices every call, and the matrices of all tensors, ~34G entries at 1%, cannot be
  kept in memory);
- factored: `FactoredProjector` on each captured batch (its side matrices, a few million entries in all, are built once
  before timing and reused for every batch, as a run reuses them; their build time is printed).
Figures: `factored_vs_dense_throughput` = dense CPU seconds / factored CPU seconds (samples per second ratio);
`accuracy_diff` = |top-1 accuracy factored - dense|; `spearman_vs_full` = mean over paraphrases of Spearman's rho
between the factored cosines and the full-gradient cosines over all originals. Also printed: the end-to-end ratio
(capture included) and the dense projection's own Spearman.

Run time: about 10 CPU minutes with the defaults, almost all of it the dense projection (its per-tensor matrices at 1%
hold ~34G random entries, generated block by block); `--fraction 0.005` halves that. Top-1 accuracy over 32
paraphrases moves in steps of 1/32 = 0.031: `accuracy_diff` below that needs more `--samples`.

Last line: RESULT factored_vs_dense_throughput=<x> accuracy_diff=<x> spearman_vs_full=<x>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradient_similarity import TINY, original  # noqa: E402  (the same model and synthetic rows)


def row(i: int) -> dict:
    """Synthetic LIMA-like row i with a ~20-fact answer (at least 128 tokens with the chat markup)."""
    return original(i, facts=20)


class CpuTimer:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def cosines(feats_p: list[dict], feats_o: list[dict], names: list[str]):
    """(n_p, n_o) cosine of the concatenated per-tensor features, from per-tensor Gram blocks (float64)."""
    import torch

    dots = sum(torch.cat([f[n] for f in feats_p]).double() @ torch.cat([f[n] for f in feats_o]).double().T for n in names)
    sq_p = sum(torch.cat([f[n] for f in feats_p]).double().pow(2).sum(1) for n in names)
    sq_o = sum(torch.cat([f[n] for f in feats_o]).double().pow(2).sum(1) for n in names)
    return (dots / torch.sqrt(sq_p[:, None] * sq_o[None, :])).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-matrix-mb", type=int, default=256, help="dense: memory for one block of a tensor's matrix")
    args = ap.parse_args()

    import numpy as np
    import torch
    from scipy import stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from llmrepro.gradients import capture, encoding, pairs, per_sample
    from llmrepro.gradients.dot_products import split_dims, tensor_seed
    from llmrepro.gradients.factored import FactoredProjector
    from llmrepro.gradients.projection import Projection, Projector
    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

    mcfg = ModelConfig(name="tiny-llama", tiny_config=TINY)
    tok, model = load_tokenizer(mcfg), load_model(mcfg).eval()
    pairs.force_template(tok, "tulu")
    n = args.samples
    originals = [row(i) for i in range(n)]
    variants = pairs.rules_variants(originals)
    enc = [encoding.encode(r, "chat", tok, "sft", 10**9) for r in variants + originals]
    lengths = [len(e["input_ids"]) for e in enc]
    params = per_sample.select_params(model, "parameters")
    sizes = {k: p.numel() for k, p in params.items()}
    total = sum(sizes.values())
    assert total >= 10_000_000 and min(lengths) >= 128, (total, min(lengths))
    plan = capture.capture_plan(model, params)
    with CpuTimer() as t_build:
        factored = FactoredProjector(plan, split_dims(sizes, round(total * args.fraction), 1, "exact"), "rademacher", 42)
    dims = factored.dims  # what each tensor is projected to: the dense projection gets the same
    names = list(dims)
    spec = lambda k: Projection(dim=dims[k], type="rademacher", projector="basic", seed=tensor_seed(k, 42),  # noqa: E731
                                max_matrix_mb=args.max_matrix_mb)

    with CpuTimer() as t_capture:
        batches = [capture.capture(model, encoding.collate(enc[i:i + args.batch_size], tok.pad_token_id), "sft", plan)
                   for i in range(0, len(enc), args.batch_size)]
    with CpuTimer() as t_factored:
        fac = [factored(b) for b in batches]
    # dense: one tensor at a time (its projector built, i.e. its first matrix block generated, inside the timing:
    # the 10M x 100k matrices of all tensors are ~400 GB, they cannot be kept), all samples in one call. The full
    # gradient's per-tensor Gram blocks (the reference ranking) are summed outside the timing from the same tensors.
    t_dense, den = CpuTimer(), {}
    t_dense.cpu = t_dense.wall = 0.0
    full_dots = full_sq = 0
    for k in names:
        with CpuTimer() as t:
            g = torch.cat([b[k].materialize() for b in batches])  # (2n, n_k) float32
            den[k] = Projector(spec(k), sizes[k]).project(g)
        t_dense.cpu, t_dense.wall = t_dense.cpu + t.cpu, t_dense.wall + t.wall
        g = g.double()
        full_dots, full_sq = full_dots + g[:n] @ g[n:].T, full_sq + g.pow(2).sum(1)
        del g
    full = (full_dots / torch.sqrt(full_sq[:n, None] * full_sq[None, n:])).numpy()

    def split(feats: dict):  # (2n, k) per tensor -> the paraphrases' and the originals' rows
        return [{k: v[:n] for k, v in feats.items()}], [{k: v[n:] for k, v in feats.items()}]

    fac_all = {k: torch.cat([f[k] for f in fac]) for k in names}
    sims = {"full": full} | {what: cosines(*split(feats), names) for what, feats in (("dense", den), ("factored", fac_all))}
    truth = np.arange(n)
    acc = {what: float((s.argmax(1) == truth).mean()) for what, s in sims.items()}
    rho = {what: float(np.mean([stats.spearmanr(sims[what][i], sims["full"][i]).statistic for i in range(n)]))
           for what in ("dense", "factored")}
    k_used = sum(dims.values())
    print(f"model: tiny-llama {TINY}, {total / 1e6:.2f}M parameters, {len(names)} tensors "
          f"({len(factored.factors)} factored, the rest dense in both); {n} paraphrases x {n} originals, "
          f"{min(lengths)}-{max(lengths)} tokens")
    print(f"dimension: {args.fraction:g} of the parameters = {round(total * args.fraction):,} nominal, {k_used:,} used by "
          "both projections (per tensor the same)")
    print(f"{'step':<34}{'CPU s':>9}{'wall s':>9}{'samples/s':>11}")
    print(f"factored side matrices built once (not timed below): {t_build.cpu:.2f} CPU s")
    for label, t in (("capture (common, forward+backward)", t_capture), ("dense per-tensor projection", t_dense),
                     ("factored projection", t_factored)):
        print(f"{label:<34}{t.cpu:>9.2f}{t.wall:>9.2f}{len(enc) / t.cpu:>11.2f}")
    print(f"{'':<34}{'top-1 accuracy':>16}{'Spearman vs full':>18}")
    for what in ("full", "dense", "factored"):
        print(f"{what:<34}{acc[what]:>16.4f}{rho.get(what, 1.0):>18.4f}")
    print(f"end to end (capture included): factored {(t_dense.cpu + t_capture.cpu) / (t_factored.cpu + t_capture.cpu):.2f}x "
          "the throughput of dense")
    print(f"RESULT factored_vs_dense_throughput={t_dense.cpu / t_factored.cpu:.1f} "
          f"accuracy_diff={abs(acc['factored'] - acc['dense']):.4f} spearman_vs_full={rho['factored']:.4f}")


if __name__ == "__main__":
    main()
