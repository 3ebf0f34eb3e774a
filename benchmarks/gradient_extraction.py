"""Gradient extraction benchmark: the source's extraction loop, this recipe's, and the physical floor, timed in
one run on the same model and data.

    python benchmarks/gradient_extraction.py [--samples 64] [--source-samples 8] [--proj-dim 2048] [--memory-samples 16]

On a tiny-llama scaled to about 10M parameters, sequences of up to 128 tokens (synthetic Tulu chat rows, sft
paradigm), gradients w.r.t. inputs_embeds projected with traker's projector (Rademacher; the basic projector
with its matrix kept on the CPU, the CUDA one on a GPU; the same projector object for every variant):
- source: the source's loop as its code runs (DarynaKalinchuk/Gradient_dimensionality_reduction @ d73147d,
  `extract_gradients.py` get_loss_gradient + the projection loop): one sample at a time, padded to max_length
  (128 here, 4096 there) and run without an attention mask, the model in train mode, `zero_grad`, the loss's
  gradient w.r.t. the input embeddings by `torch.autograd.grad`, flattened and projected on its own (one row
  per projector call); on `--source-samples` samples (it is slow; throughput is per sample either way);
- ours: the recipe's way: one backward per batch (`per_sample.input_grads`, attention mask, right padding to the
  batch's longest), padded to max_length afterwards, one projection call per batch;
- floor: one batched forward + backward over the same samples giving the same per-sample outputs, d loss_i /
  d inputs_embeds_i (`per_sample.input_grads` on batches), without padding them out or projecting.
- speedup_vs_source: samples/s of ours over the source's; overhead_vs_floor: ours' time over the floor's
  (the old `overhead_vs_batched` timed `model(**batch).loss.backward()`, which also computes every parameter's
  gradient, so it flattered the recipe);
- memory_growth_4x: peak RSS of the real `extract-gradients` run (fresh process each) on 4x the samples
  over that on 1x (`--memory-samples`), with the same shard size; goal ~1 (shards are streamed to disk).
- spearman: mean Spearman rho, over test samples, of train rankings (dot product) by gradients projected
  to the default 16384 dims against the full gradients (8 test samples against the other train samples).
Timing: on the CPU torch runs on one thread and the times are process CPU time (robust to other load on a
shared machine); on a GPU, wall time after synchronizing.
Ends with `RESULT speedup_vs_source=<x> overhead_vs_floor=<x> memory_growth_4x=<x> spearman=<x>`.
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
    """Seconds of fn(): process CPU time on the CPU, wall time after synchronizing on a GPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter() if cuda else time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() if cuda else time.process_time()) - start


def source_way(model, tok, examples, projector: Projector) -> float:
    """Seconds per sample, the source's loop: each sample padded to max_length and run without a mask, train
    mode, one backward per sample, one projection call per gradient."""
    def loop():
        model.train()  # the source's mode (tiny-llama has no dropout, as OLMo-2)
        for ex in examples:
            batch = encoding.collate([ex], tok.pad_token_id, length=SEQ, attend_padding=True)
            model.zero_grad()
            embeds = model.get_input_embeddings().weight[batch["input_ids"]].detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
            (g,) = torch.autograd.grad(loss, embeds)
            projector.project(g.detach().flatten().unsqueeze(0))
        model.eval()

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
    out = []
    seconds = timed(lambda: out.extend(batches()))
    return seconds / len(examples), torch.cat(out)


def floor_way(model, tok, examples, batch_size: int) -> float:
    """Seconds per sample of the bare per-sample input gradients: batched forward + backward, nothing else."""
    def run():
        for i in range(0, len(examples), batch_size):
            per_sample.input_grads(model, encoding.collate(examples[i:i + batch_size], tok.pad_token_id), "sft")

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
    if not torch.cuda.is_available():
        torch.set_num_threads(1)

    cfg = ModelConfig(name="tiny-llama", tiny_config=TINY_10M)
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    examples = [encoding.encode(r, "chat", tok, "sft", SEQ) for r in chat_rows(args.samples)]
    print(f"model: tiny-llama {n_params / 1e6:.1f}M parameters; {args.samples} samples of "
          f"{np.mean([len(e['input_ids']) for e in examples]):.0f} tokens; gradient dim {SEQ * model.config.hidden_size}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    kind = "cuda" if device == "cuda" else "basic"
    projector = Projector(Projection(dim=args.proj_dim, projector=kind), SEQ * model.config.hidden_size, device)
    ours, grads = recipe_way(model, tok, examples, projector, args.batch_size)
    grads = grads.cpu()
    source = source_way(model, tok, examples[:args.source_samples], projector)
    floor = floor_way(model, tok, examples, args.batch_size)
    print(f"{'way':<56}{'ms/sample':>10}")
    for label, t in [(f"source: padded, one at a time, project per sample ({args.source_samples})", source),
                     (f"recipe: batch {args.batch_size}, one projection per batch", ours),
                     ("floor: batched forward+backward, input gradients only", floor)]:
        print(f"{label:<56}{t * 1e3:>10.1f}")

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

    print(f"RESULT speedup_vs_source={source / ours:.2f} overhead_vs_floor={ours / floor:.2f} "
          f"memory_growth_4x={peaks[1] / peaks[0]:.2f} spearman={spearman:.4f}")


if __name__ == "__main__":
    main()
