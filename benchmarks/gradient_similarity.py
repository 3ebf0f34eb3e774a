"""Benchmark: streamed per-tensor gradient dot products (this recipe) vs the source's approach.

    python benchmarks/gradient_similarity.py [--samples 64]

tiny-llama scaled to ~10M parameters, `--samples` paraphrased samples (word-rule paraphrases of chat rows)
each against its top-5 BM25 candidates among as many originals, prompt-masked SFT loss, eval mode.
- source: one sample at a time (zero_grad, loss.backward, clone the gradient dict), every sample's gradient
  dict kept, then the per-tensor dot products of every pair (`g1.flatten().dot(g2.flatten()).item()`);
- streamed: `llmrepro.gradients.dot_products.stream_dot_products` over `per_sample.per_sample_grads` (chunk 8, batch 8).
Each variant runs in a fresh process (peak RSS from ru_maxrss); the streamed one also at samples/4, for the
memory growth as the sample count grows 4x. Both give the same dot products (checked, rtol 1e-4).
Last line: RESULT speedup_vs_source=<x> memory_growth_4x=<x>
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

TINY = {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1024, "num_attention_heads": 6,
        "num_key_value_heads": 2}


def rows(n: int) -> list[dict]:
    """n single-turn chat rows: the lima fixture's, numbered to make more."""
    from llmrepro.gradients import pairs
    from llmrepro.lm import fixtures

    base = pairs.single_turn(fixtures.rows("lima"))
    return [{"id": f"s{i}", "messages": [{"role": "user", "content": f"{r['messages'][0]['content']} (case {i})"},
                                         {"role": "assistant", "content": r["messages"][1]["content"]}]}
            for i, r in ((i, base[i % len(base)]) for i in range(n))]


def worker(mode: str, n: int, out: str) -> None:
    import torch

    from llmrepro.gradients import candidates, dot_products, encoding, pairs, per_sample
    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

    torch.manual_seed(42)
    mcfg = ModelConfig(name="tiny-llama", tiny_config=TINY, attn_implementation="eager")
    tok, model = load_tokenizer(mcfg), load_model(mcfg).eval()
    originals = rows(n)
    variants = pairs.rules_variants(originals)
    cands = candidates.bm25_candidates([candidates.first_message(v) for v in variants],
                                       [candidates.first_message(o) for o in originals], list(range(n)))
    enc = {k: [encoding.encode(r, "chat", tok, "sft", 128) for r in rs] for k, rs in (("p", variants), ("o", originals))}
    names = [n_ for n_, p in model.named_parameters()]
    start = time.perf_counter()
    if mode == "source":
        def grad_dict(ex):
            model.zero_grad()
            model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.backward()
            return {n_: p.grad.detach().clone() for n_, p in model.named_parameters()}
        stored = {(k, i): grad_dict(ex) for k in ("p", "o") for i, ex in enumerate(enc[k])}
        po = {(p, o): [stored["p", p][t].flatten().dot(stored["o", o][t].flatten()).item() for t in names]
              for p in range(n) for o in cands[p]}
    else:
        def grads(kind, idx):
            g = per_sample.per_sample_grads(model, encoding.collate([enc[kind][i] for i in idx], tok.pad_token_id), "sft")
            return {n_: t.reshape(len(idx), -1) for n_, t in g.items()}
        dots = dot_products.stream_dot_products(grads, cands, chunk_size=8, batch_size=8)
        po = {k: v[0].tolist() for k, v in dots.pairs.items()}
    seconds = time.perf_counter() - start
    sample = {f"{p},{o}": po[(p, o)] for p, o in sorted(po)[:10]}
    json.dump({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "params": sum(p.numel() for p in model.parameters()), "pairs": len(po), "sample": sample}, open(out, "w"))


def measure(mode: str, n: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--worker", mode, "--samples", str(n), "--out", f.name], check=True,
                       env={**os.environ, "LLMREPRO_PROGRESS": "0", "HF_HUB_OFFLINE": "1"})
        return json.load(open(f.name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.samples, args.out)
    import numpy as np

    n = args.samples
    small, stream, source = measure("stream", n // 4), measure("stream", n), measure("source", n)
    for key in source["sample"]:
        np.testing.assert_allclose(stream["sample"][key], source["sample"][key], rtol=1e-4, atol=1e-6)
    print(f"model: tiny-llama {TINY}, {source['params'] / 1e6:.1f}M parameters; {n} paraphrased samples x 5 candidates "
          f"({source['pairs']} pairs)")
    print(f"{'variant':<34}{'samples':>8}{'seconds':>10}{'samples/s':>11}{'peak RSS MB':>13}")
    for name, r, m in (("source (store all, then dot)", source, n), ("streamed", small, n // 4), ("streamed", stream, n)):
        print(f"{name:<34}{m:>8}{r['seconds']:>10.2f}{m / r['seconds']:>11.2f}{r['rss_mb']:>13.0f}")
    speedup = source["seconds"] / stream["seconds"]
    growth = stream["rss_mb"] / small["rss_mb"]
    print(f"source peak RSS / streamed peak RSS at {n} samples: {source['rss_mb'] / stream['rss_mb']:.2f}x")
    print(f"RESULT speedup_vs_source={speedup:.2f} memory_growth_4x={growth:.2f}")


if __name__ == "__main__":
    main()
