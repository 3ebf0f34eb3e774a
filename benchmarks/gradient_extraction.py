"""Gradient extraction benchmark: this recipe's batched extraction against the source's one-at-a-time loop.

    python benchmarks/gradient_extraction.py [--samples 64] [--source-samples 8] [--proj-dim 2048] [--memory-samples 16]

On a tiny-llama scaled to about 10M parameters, sequences of 128 tokens (synthetic Tulu chat rows, sft
paradigm), gradients w.r.t. inputs_embeds projected with traker's BasicProjector (Rademacher), all in
one process so the ratios compare like with like:
- speedup_vs_source: samples/s of the recipe's way (one backward per batch, one projection call per
  batch, the matrix kept) over the source's way (zero_grad, backward, flatten, project one gradient per
  call with traker's default block size, so the matrix is regenerated for every sample); goal >= 5x.
  The source's way runs on `--source-samples` samples (it is slow); throughput is per sample either way.
- overhead_vs_batched: per-sample extraction time over one plain batched forward+backward of the same
  samples; goal <= 2x.
- memory_growth_4x: peak RSS of the real `extract-gradients` run (fresh process each) on 4x the samples
  over that on 1x (`--memory-samples`), with the same shard size; goal ~1 (shards are streamed to disk).
- spearman: mean Spearman rho, over test samples, of train rankings (dot product) by gradients projected
  to the default 16384 dims against the full gradients (8 test samples against the other train samples).
Ends with `RESULT speedup_vs_source=<x> overhead_vs_batched=<x> memory_growth_4x=<x> spearman=<x>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from trak.projectors import BasicProjector, ProjectionType

from llmrepro.gradients import encoding, per_sample
from llmrepro.gradients.projection import Projection, Projector
from llmrepro.gradients.similarity import score_matrix as similarity
from llmrepro.lm.fixtures import facts
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
from llmrepro.recipes.projection_quality import agreement

TINY_10M = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
            "intermediate_size": 1024}
SEQ = 128
EXPERIMENT = "gradients/olmo2-7b-sft-rademacher16384-train"


def chat_rows(n: int) -> list[dict]:
    """Synthetic Tulu rows: a short question and an answer long enough to fill 128 tokens."""
    sentences = [f"{city} is the capital of {country}." for city, country in facts.CAPITALS]
    return [{"dataset": "bench", "id": f"bench_{i}", "messages": [
        {"role": "user", "content": f"Tell me about {facts.CAPITALS[i % 16][1]}."},
        {"role": "assistant", "content": " ".join(sentences[(i + j) % 16] for j in range(12))}]} for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def source_way(model, tok, examples, proj_dim: int) -> float:
    """Seconds per sample, the source's loop: one sample per backward, one projection call per gradient."""
    grad_dim = SEQ * model.config.hidden_size
    projector = BasicProjector(grad_dim, proj_dim, 42, ProjectionType.rademacher, "cpu")  # default block_size 100

    def loop():
        for ex in examples:
            batch = encoding.collate([ex], tok.pad_token_id)
            model.zero_grad()
            embeds = model.get_input_embeddings().weight[batch["input_ids"]].detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
            (g,) = torch.autograd.grad(loss, embeds)
            g = torch.nn.functional.pad(g, (0, 0, 0, SEQ - g.shape[1]))
            projector.project(g.flatten().unsqueeze(0), model_id=0)

    return timed(loop) / len(examples)


def recipe_way(model, tok, examples, projector: Projector, batch_size: int) -> tuple[float, torch.Tensor]:
    """(seconds per sample, the full (N, D) gradients): one backward and one projection call per batch."""
    def batches():
        for i in range(0, len(examples), batch_size):
            g = per_sample.input_grads(model, encoding.collate(examples[i:i + batch_size], tok.pad_token_id), "sft")
            g = torch.nn.functional.pad(g, (0, 0, 0, SEQ - g.shape[1])).flatten(1).detach()
            projector.project(g)
            yield g

    projector.project(torch.zeros(1, projector.grad_dim))  # the matrix is generated once, before timing
    start = time.perf_counter()
    grads = torch.cat(list(batches()))
    return (time.perf_counter() - start) / len(examples), grads


def batched_forward_backward(model, tok, examples, batch_size: int) -> float:
    def run():
        for i in range(0, len(examples), batch_size):
            model.zero_grad()
            model(**encoding.collate(examples[i:i + batch_size], tok.pad_token_id)).loss.backward()

    return timed(run) / len(examples)


def recipe_peak_mb(data_file: Path, samples: int, per_file: int, proj_dim: int, out: Path) -> float:
    """Peak RSS of a real extract-gradients run in a fresh process."""
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_10M.items()) + "}"
    argv = [sys.executable, "-m", "llmrepro.cli", "run", EXPERIMENT, "--profile", "smoke", "--output-dir", str(out),
            f"model.tiny_config={tiny}", "model.name=tiny-llama", f"data.name={data_file}", f"data.limit={samples}",
            f"projection.dim={proj_dim}", f"max_length={SEQ}", "batch_size=8", f"gradients_per_file={per_file}"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "LLMREPRO_PROGRESS": "0"})
    (metrics,) = out.glob("**/metrics.json")
    return json.loads(metrics.read_text())["peak_memory_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--source-samples", type=int, default=8)
    p.add_argument("--proj-dim", type=int, default=2048, help="projection dimension for the throughput runs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--memory-samples", type=int, default=16, help="samples of the 1x memory run (4x: four times)")
    args = p.parse_args()
    torch.manual_seed(0)

    cfg = ModelConfig(name="tiny-llama", tiny_config=TINY_10M)
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    examples = [encoding.encode(r, "chat", tok, "sft", SEQ) for r in chat_rows(args.samples)]
    print(f"model: tiny-llama {n_params / 1e6:.1f}M parameters; {args.samples} samples of "
          f"{np.mean([len(e['input_ids']) for e in examples]):.0f} tokens; gradient dim {SEQ * model.config.hidden_size}")

    projector = Projector(Projection(dim=args.proj_dim), SEQ * model.config.hidden_size)
    ours, grads = recipe_way(model, tok, examples, projector, args.batch_size)
    source = source_way(model, tok, examples[:args.source_samples], args.proj_dim)
    plain = batched_forward_backward(model, tok, examples, args.batch_size)
    print(f"{'way':<44}{'ms/sample':>10}")
    for label, t in [(f"source: one at a time, project per sample ({args.source_samples})", source),
                     (f"recipe: batch {args.batch_size}, one projection per batch", ours),
                     ("plain batched forward+backward (limit)", plain)]:
        print(f"{label:<44}{t * 1e3:>10.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "bench.jsonl"
        n = args.memory_samples
        data_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4 * n)))
        peaks = [recipe_peak_mb(data_file, m, n // 2, args.proj_dim, Path(tmp) / f"out{m}") for m in (n, 4 * n)]
    print(f"peak memory of extract-gradients: {peaks[0]:.0f} MB ({n} samples), {peaks[1]:.0f} MB ({4 * n})")

    test, train = grads[:8], grads[8:]
    default = Projector(Projection(), grads.shape[1])  # 16384 dims, Rademacher, seed 42
    full_scores = similarity(test, train, "dot").numpy()
    proj = default.project(grads)
    proj_scores = similarity(proj[:8], proj[8:], "dot").numpy()
    spearman = float(np.mean([agreement(full_scores[i], proj_scores[i], 10)["spearman"] for i in range(len(test))]))
    print(f"Spearman rho, projected ({default.spec.dim}) vs full rankings: {spearman:.4f}")

    print(f"RESULT speedup_vs_source={source / ours:.2f} overhead_vs_batched={ours / plain:.2f} "
          f"memory_growth_4x={peaks[1] / peaks[0]:.2f} spearman={spearman:.4f}")


if __name__ == "__main__":
    main()
