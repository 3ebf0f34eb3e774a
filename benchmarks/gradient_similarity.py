"""Benchmark: per-tensor gradient dot products of variants with their 5 candidates (layer-dot-products), three
ways on the same model and data, each in a fresh process (time, and peak RSS from ru_maxrss):

    python benchmarks/gradient_similarity.py [--samples 32] [--chunk-size 8] [--batch-size 8]

- source: the source's algorithm as its code runs (lukas-hinterleitner/master-thesis @ e6ebdbe,
  `src/computation.py` `__calculate_layerwise_dot_products` + `src/model_operations.py` `get_gradients`): for each
  variant in order, `model.zero_grad()`, one forward of that one sample (`input_ids, labels, attention_mask`,
  the model's default attention), `loss.backward()`, every parameter's gradient `.clone().detach().cpu()`; its
  per-tensor self dot products `g.flatten().to(device).dot(...).item()`; its BM25 scores; then for each of its 5
  candidates in BM25 order the same for the candidate (recomputed every time it is met: 6 backward passes per
  variant), its self dot products the first time it is met, and the 113-style per-tensor `.item()` dot products
  with the variant. At most two gradient dicts are alive.
- ours: the recipe's own code (`llmrepro.gradients.pairs.compute_dot_products`): chunks of `--chunk-size` variants
  grouped by shared candidates, per-sample gradients by `torch.func.vmap` in batches of `--batch-size` (eager
  attention), per-tensor dot products as matrix products; it also runs at samples/4 for the memory growth.
- ghost: the recipe's code with `method: ghost`: per-sample factors (each linear layer's inputs and output
  gradients) captured in one batched forward + backward per batch of `--batch-size` (`gradients.capture`, the
  default attention), the dot products of linear layers where 2 T^2 <= d_in * d_out (T: the longest sample)
  taken from the factors without building the gradients (`gradients.ghost`), the other tensors (embedding,
  norms, ...) materialized from them; it also runs at samples/4. `ghost_rel_error`: the largest, over tensors,
  relative L2 difference ||D_ghost - D_ours|| / ||D_ours|| of its per-tensor dot products (all pairs, p.p, o.o)
  from those of `ours`.
- hooks: the same capture with every tensor materialized (`method: hooks`), to separate the two effects.
- floor: the physical floor, one batched forward + backward over the unique samples (each variant and each
  distinct candidate once, batches of `--batch-size`, the default attention), of the sum of the per-sample mean
  token losses: the same per-sample losses whose gradients the dot products are of; any method pays at least
  this. (It yields their sum, not per-sample gradients: materializing those, or taking their dot products
  without materializing them, is the overhead the other two add.)

Candidates: when the source's published similarities are present (`--published`, default the shared copy of
`data/gradient_similarity/paraphrased/.../sample_size_full.json`), the first `--samples` variants with their real
candidate lists (so the sharing of candidates between variants is the real one); otherwise BM25 over the
synthetic rows. Samples are synthetic chat rows of ~128 tokens (`rows`), tiny-llama scaled to ~10M parameters,
float32, eval mode, CPU unless CUDA is there. The dot products of source and ours are checked equal (rtol 1e-4).

Timing: on the CPU each worker runs torch on one thread and the ratios use the process's CPU time (user +
system), which other load on a shared machine does not inflate the way it does wall time (both are printed);
on a GPU, wall time after `torch.cuda.synchronize()`.

Last line: RESULT speedup_vs_source=<x> overhead_vs_floor=<x> memory_growth_4x=<x> ghost_rel_error=<x> method=<m>,
the first three of the faster of the recipe's vmap and ghost methods here (`method`; every variant's figures are in
the table above it). Ghost dot products are computed only for the pairs that are read (each costs
T_p T_o (d_in + d_out), against T d_in d_out per sample to build a gradient and d_in d_out per pair to take its dot
product): the rule 2 T^2 <= d_in d_out (the issue's) bounds their memory; how much time they save depends on T and on
how many candidates a sample meets. No method can beat the floor: on a slice of n variants of the published
candidate graph, where few candidates are shared, speedup_vs_source is bounded by about source/floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1024, "num_attention_heads": 6,
        "num_key_value_heads": 2}
PUBLISHED = (Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "gradient-similarity" / "data"
             / "gradient_similarity" / "paraphrased" / "amd" / "AMD-OLMo-1B-SFT" / "sample_size_full.json")


def original(i: int, facts: int = 12) -> dict:
    """Synthetic LIMA-like row number i: a question and an answer of `facts` facts (12: ~120 tokens) from the
    fact tables."""
    from llmrepro.lm.fixtures.facts import CAPITALS

    city, country = CAPITALS[i % len(CAPITALS)]
    table = [f"{c} is the capital of {k}." for c, k in CAPITALS]
    answer = " ".join(table[(i * 7 + j) % len(table)] for j in range(facts))
    return {"id": f"lima_{i}", "dataset": "lima", "messages": [
        {"role": "user", "content": f"Question {i}: what do you know about {city} and {country}?"},
        {"role": "assistant", "content": answer}]}


def problem(n: int, published: str | None) -> tuple[list[dict], list[dict], list[list[int]], str]:
    """(variants, originals, candidates, where the candidates come from)."""
    from llmrepro.gradients import candidates as cands_
    from llmrepro.gradients.pairs import rules_variants

    if published and Path(published).is_file():
        sims = json.loads(Path(published).read_text())
        num = lambda s: int(s.rsplit("_", 1)[1])  # noqa: E731
        order = sorted(sims, key=num)[:n]
        ids = sorted({num(o) for p in order for o in sims[p]} | {num(p) for p in order})
        index = {i: k for k, i in enumerate(ids)}
        originals = [original(i) for i in ids]
        variants = rules_variants([original(num(p)) for p in order])
        cands = [[index[num(o)] for o in sims[p]] for p in order]
        return variants, originals, cands, f"published candidate lists of the first {n} of {len(sims)} variants"
    originals = [original(i) for i in range(n)]
    variants = rules_variants(originals)
    cands = cands_.bm25_candidates([v["messages"][0]["content"] for v in variants],
                                   [o["messages"][0]["content"] for o in originals], list(range(n)))
    return variants, originals, cands, f"BM25 over {n} synthetic originals"


def model_config(attn: str | None):
    from llmrepro.lm.models import ModelConfig

    return ModelConfig(name="tiny-llama", tiny_config=TINY, attn_implementation=attn)


class Timer:
    """Wall and process CPU seconds of a block (CUDA synchronized at both ends)."""

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.seconds = self.wall if torch.cuda.is_available() else self.cpu


def worker(mode: str, args) -> dict:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)

    from llmrepro.core.context import RunContext
    from llmrepro.gradients import encoding, pairs, per_sample
    from llmrepro.gradients.dot_products import plan_chunks
    from llmrepro.lm.models import default_device, load_model, load_tokenizer

    torch.manual_seed(42)
    variants, originals, cands, where = problem(args.samples, args.published)
    tok = load_tokenizer(model_config(None))
    pairs.force_template(tok, "tulu")
    enc = {k: [encoding.encode(r, "chat", tok, "sft", 10**9) for r in rs] for k, rs in (("p", variants), ("o", originals))}
    out: dict = {"where": where, "pairs": sum(map(len, cands)), "unique": len(variants) + len({o for c in cands for o in c})}
    if mode in ("ours", "ghost", "hooks"):
        method = {"ours": "vmap", "ghost": "ghost", "hooks": "hooks"}[mode]
        cfg = pairs.PairsConfig(model=model_config("eager" if mode == "ours" else None),
                                data={"name": "fixture:lima", "format": "chat"}, method=method,
                                chunk_size=args.chunk_size, batch_size=args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(dir=Path(tmp) / "bench" / "similarity" / "run")
            loaded = pairs.Pairs(variants, originals, cands)
            model = pairs.load_model_for_gradients(cfg, ctx)  # the model load is not part of the timing
            with Timer() as t:
                dots, _ = pairs.compute_dot_products(cfg, loaded, ctx, loaded=model)
        names = list(dots.tensors)
        out["sample"] = {f"{p},{o}": dots.pairs[(p, o)][0].tolist() for p, o in sorted(dots.pairs)[:10]}
        _, po, pp, oo = dots.matrices()
        out["all"] = [po.tolist(), pp.tolist(), oo.tolist()]
        out["ghost_tensors"] = sum(m == "ghost" for m in dots.methods.values())
        out["max_tokens"] = dots.max_tokens
        out["gradients"] = sum(len(ps) + len(os) for ps, os in plan_chunks(cands, args.chunk_size))
    else:
        model = load_model(model_config(None)).eval().to(default_device())
        dev = next(model.parameters()).device
        names = [n for n, _ in model.named_parameters()]
        if mode == "source":
            from rank_bm25 import BM25Okapi

            bm25 = BM25Okapi([o["messages"][0]["content"].split() for o in originals])

            def get_gradients(ex):  # src/model_operations.py get_gradients
                model.zero_grad()
                ids = torch.tensor(ex["input_ids"]).reshape(1, -1).to(dev)
                model(input_ids=ids, labels=torch.tensor(ex["labels"]).reshape(1, -1).to(dev),
                      attention_mask=torch.ones_like(ids), use_cache=False).loss.backward()
                return {n: p.grad.clone().detach().cpu() for n, p in model.named_parameters() if p.grad is not None}

            def dot(g1, g2):
                return {n: g1[n].flatten().to(dev).dot(g2[n].flatten().to(dev)).item() for n in g1}

            po, seen, t = {}, set(), Timer().__enter__()
            for p, ex in enumerate(enc["p"]):
                g_p = get_gradients(ex)
                dot(g_p, g_p)
                bm25.get_scores(variants[p]["messages"][0]["content"].split())
                for o in cands[p]:
                    g_o = get_gradients(enc["o"][o])
                    if o not in seen:
                        seen.add(o)
                        dot(g_o, g_o)
                    po[(p, o)] = dot(g_p, g_o)
            t.__exit__()
            out["sample"] = {f"{p},{o}": [po[(p, o)][n] for n in names] for p, o in sorted(po)[:10]}
            out["gradients"] = 6 * len(variants)
        else:  # floor
            unique = [enc["p"][p] for p in range(len(variants))] + [enc["o"][o] for o in sorted({o for c in cands for o in c})]
            t = Timer().__enter__()
            for i in range(0, len(unique), args.batch_size):
                batch = encoding.collate(unique[i:i + args.batch_size], tok.pad_token_id)
                model.zero_grad()
                logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
                per_sample.per_sample_loss(logits, batch["labels"].to(dev), "sft").sum().backward()
            t.__exit__()
            out["gradients"] = len(unique)
        out["params"] = sum(p.numel() for p in model.parameters())
    out |= {"seconds": t.seconds, "wall_s": t.wall, "cpu_s": t.cpu}
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["tensors"] = len(names)
    return out


def measure(mode: str, args, samples: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = [sys.executable, __file__, "--worker", mode, "--samples", str(samples), "--out", f.name,
                "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size),
                "--published", args.published or ""]
        subprocess.run(argv, check=True, env={**os.environ, "LLMREPRO_PROGRESS": "0", "HF_HUB_OFFLINE": "1"})
        return json.load(open(f.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--published", default=str(PUBLISHED), help="the source's similarities JSON ('' for BM25)")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        json.dump(worker(args.worker, args), open(args.out, "w"))
        return
    import numpy as np

    n = args.samples
    floor, ours, small, source = (measure("floor", args, n), measure("ours", args, n), measure("ours", args, max(1, n // 4)),
                                  measure("source", args, n))
    ghost, ghost_small, hooks = measure("ghost", args, n), measure("ghost", args, max(1, n // 4)), measure("hooks", args, n)
    for key in source["sample"]:
        np.testing.assert_allclose(ours["sample"][key], source["sample"][key], rtol=1e-4, atol=1e-7)
    rel = max(float(np.linalg.norm(np.subtract(g, m)[:, t]) / max(np.linalg.norm(np.asarray(m)[:, t]), 1e-30))
              for g, m in zip(ghost["all"], ours["all"], strict=True) for t in range(np.shape(m)[1]))
    rel_hooks = max(float(np.linalg.norm(np.subtract(g, m)[:, t]) / max(np.linalg.norm(np.asarray(m)[:, t]), 1e-30))
                    for g, m in zip(hooks["all"], ours["all"], strict=True) for t in range(np.shape(m)[1]))
    print(f"model: tiny-llama {TINY}, {floor['params'] / 1e6:.1f}M parameters, {floor['tensors']} tensors; {n} variants "
          f"x 5 candidates ({source['pairs']} pairs, {source['unique']} unique samples); candidates: {source['where']}")
    print(f"{'variant':<40}{'samples':>8}{'gradients':>10}{'CPU s':>8}{'wall s':>8}{'variants/s':>11}{'peak RSS MB':>12}")
    rows = [("source (1 + 5 backward per variant)", source, n), ("ours (streamed, vmap)", small, max(1, n // 4)),
            ("ours (streamed, vmap)", ours, n), ("hooks (captured, materialized)", hooks, n),
            ("ghost (captured, ghost dots)", ghost_small, max(1, n // 4)), ("ghost (captured, ghost dots)", ghost, n),
            ("floor (unique samples, batched)", floor, n)]
    for name, r, m in rows:
        print(f"{name:<40}{m:>8}{r['gradients']:>10}{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}{m / r['seconds']:>11.2f}"
              f"{r['rss_mb']:>12.0f}")
    print(f"dot products of source and ours agree (rtol 1e-4) on {len(source['sample'])} pairs")
    print(f"ghost: {ghost['ghost_tensors']} of {ghost['tensors']} tensors as ghost dot products (T = {ghost['max_tokens']} "
          f"tokens); largest per-tensor relative difference from ours: ghost {rel:.2e}, hooks {rel_hooks:.2e}")
    if args.published and Path(args.published).is_file():  # the whole run's candidate graph, at the measured costs
        from llmrepro.gradients.dot_products import plan_chunks

        sims = json.loads(Path(args.published).read_text())
        index = {o: i for i, o in enumerate(sorted({o for c in sims.values() for o in c}))}
        whole = [[index[o] for o in c] for c in sims.values()]
        ours_n = sum(len(ps) + len(os) for ps, os in plan_chunks(whole, args.chunk_size))
        counts = {"source": 6 * len(whole), "ours": ours_n, "ghost": ours_n, "floor": len(whole) + len(index)}
        cost = {k: r["seconds"] / r["gradients"] for k, r in (("source", source), ("ours", ours), ("ghost", ghost),
                                                               ("floor", floor))}
        est = {k: counts[k] * cost[k] for k in counts}
        print(f"estimate for all {len(whole)} variants (gradients source/ours/floor {counts['source']}/{counts['ours']}/"
              f"{counts['floor']}, at the measured seconds per gradient): speedup_vs_source~{est['source'] / est['ours']:.2f} "
              f"overhead_vs_floor~{est['ours'] / est['floor']:.2f} (vmap), ~{est['source'] / est['ghost']:.2f} and "
              f"~{est['ghost'] / est['floor']:.2f} (ghost)")
    print(f"vmap: speedup_vs_source={source['seconds'] / ours['seconds']:.2f} overhead_vs_floor="
          f"{ours['seconds'] / floor['seconds']:.2f} memory_growth_4x={ours['rss_mb'] / small['rss_mb']:.2f}; hooks: "
          f"speedup_vs_source={source['seconds'] / hooks['seconds']:.2f} overhead_vs_floor={hooks['seconds'] / floor['seconds']:.2f}")
    best, r, r_small = min((("vmap", ours, small), ("ghost", ghost, ghost_small)), key=lambda m: m[1]["seconds"])
    print(f"RESULT speedup_vs_source={source['seconds'] / r['seconds']:.2f} "
          f"overhead_vs_floor={r['seconds'] / floor['seconds']:.2f} "
          f"memory_growth_4x={r['rss_mb'] / r_small['rss_mb']:.2f} ghost_rel_error={rel:.2e} method={best}")


if __name__ == "__main__":
    main()
