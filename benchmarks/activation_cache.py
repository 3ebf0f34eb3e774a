"""Benchmark: activation caching (cache-activations) against the thesis' one-statement-at-a-time loop, on the
built-in SmolLM2-135M-Instruct and the real geometry-of-truth cities statements, each in a fresh process:

    python benchmarks/activation_cache.py [--source-n 64] [--batch-size 32] [--no-grad-loop]
                                          [--cities ../shared/data/geometry-of-truth/cities.csv]

- source: the Detection notebook's `compute_activations` (MikkelGodsk/Masters-thesis @ c43c1f5, cells 9-12) as it
  runs: a forward pre-hook per layer on o_proj storing `input[0][..., -1, :].detach().cpu().numpy().astype(float16)`,
  `tokenizer.encode(statement, return_tensors='pt')` and one forward per statement (that notebook has no no_grad;
  `--no-grad-loop` adds the same loop under torch.no_grad, as the ITI notebooks' copy), then the stack, reshape and
  transpose to [N, L, H, d]; on the first `--source-n` cities statements (its statements/s do not depend on N).
- ours: `representations.activations.cache` (right-padded batches, the backbone run without its LM head, last real
  token gathered in the hook, rows written straight into the .npy files), heads and residual stream, at N = 1496/4 and 4N = all 1496 cities
  statements: throughput from the N run; memory growth = the peak resident memory above the post-load level, at 4N
  over at N (flat = 1.0).
Both produce the same activations (checked on the source's rows, float16 tolerance). The 4N run's residual streams
then feed a logistic probe (standardised, `LogisticRegression(max_iter=1000)`) per layer under grouped (by city)
stratified 5-fold CV; the best layer's accuracy is `cities_probe_acc` (chance: 0.5).

Last line: RESULT cache_speedup=<x> memory_growth_4x=<x> cities_probe_acc=<x>
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

ROOT = Path(__file__).resolve().parents[1]
CITIES = ROOT.parent / "shared" / "data" / "geometry-of-truth" / "cities.csv"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(cities: Path):
    import torch

    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
    from llmrepro.representations.datasets import TruthData, detection

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = ModelConfig(name="smollm2-135m-instruct")
    return load_model(cfg).eval(), load_tokenizer(cfg), detection(TruthData(name="cities", path=str(cities)))


def source_loop(model, tok, statements, no_grad: bool):
    """The thesis' compute_activations, as its Detection notebook runs it (hooks, batch 1)."""
    import contextlib

    import numpy as np
    import torch

    from llmrepro.representations import hooks

    stores = [[] for _ in hooks.out_projections(model)]
    handles = [p.register_forward_pre_hook(
        lambda m, inp, store=store: store.append(inp[0][..., -1, :].detach().cpu().numpy().astype(np.float16)))
        for p, store in zip(hooks.out_projections(model), stores, strict=True)]
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        for s in statements:
            model(tok.encode(s, return_tensors="pt"))
    for h in handles:
        h.remove()
    acts = np.stack([np.vstack(s) for s in stores], 0)  # [L, N, H*d]
    n_heads, head_dim = hooks.head_shape(model)
    return acts.reshape(acts.shape[0], len(statements), n_heads, head_dim).transpose(1, 0, 2, 3)


def worker(args) -> None:
    import numpy as np

    from llmrepro.representations import activations

    model, tok, st = load(Path(args.cities))
    texts = st.texts[: args.n]
    base = rss_mb()
    started = time.perf_counter()
    if args.worker.startswith("source"):
        acts = source_loop(model, tok, texts, no_grad=args.worker == "source-no-grad")
        np.save(Path(args.out) / "heads.npy", acts)
    else:
        activations.cache(model, tok, texts, st.labels[: args.n], st.groups[: args.n], Path(args.out), args.batch_size,
                          heads=True, resid=True)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "extra_peak_mb": peak_mb() - base, "n": len(texts)}))


def spawn(kind: str, n: int, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--out", str(out), "--batch-size",
           str(args.batch_size), "--cities", str(args.cities)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_accuracy(run: Path) -> tuple[float, int]:
    """Best-layer grouped 5-fold CV accuracy of the logistic probe on the cached residual streams of cities.csv."""
    import numpy as np

    from llmrepro.representations import probes

    resid = np.load(run / "resid.npy")
    y, groups = np.load(run / "labels.npy").astype(int), np.load(run / "groups.npy")
    accs = [probes.cross_val_accuracy(resid[:, layer], y, groups, "logistic", "grouped", 5, 0).mean()
            for layer in range(resid.shape[1])]
    return float(max(accs)), int(np.argmax(accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-grad-loop", action="store_true")
    ap.add_argument("--cities", default=str(CITIES))
    ap.add_argument("--worker", choices=["source", "source-no-grad", "ours"])
    ap.add_argument("--n", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.cities).is_file():
        sys.exit(f"cities.csv not found at {args.cities} (geometry-of-truth datasets/cities.csv; --cities PATH)")
    import numpy as np

    total = sum(1 for _ in open(args.cities, encoding="utf-8")) - 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = spawn("source", args.source_n, tmp / "source", args)
        src_ng = spawn("source-no-grad", args.source_n, tmp / "source-no-grad", args) if args.no_grad_loop else None
        ours = spawn("ours", total // 4, tmp / "ours", args)
        ours4 = spawn("ours", total, tmp / "ours4", args)
        a = np.load(tmp / "source" / "heads.npy").astype(np.float32)
        b = np.load(tmp / "ours" / "heads.npy")[: args.source_n].astype(np.float32)
        max_diff = float(np.abs(a - b).max())
        if not np.allclose(a, b, atol=5e-2, rtol=1e-2):
            sys.exit(f"activations differ between the source loop and the batched cache (max |diff| {max_diff})")
        acc, layer = probe_accuracy(tmp / "ours4")
    src_rate, ours_rate = src["n"] / src["seconds"], ours["n"] / ours["seconds"]
    growth = max(ours4["extra_peak_mb"], 1.0) / max(ours["extra_peak_mb"], 1.0)
    print(json.dumps({"source_n": src["n"], "ours_n": ours["n"], "ours_4n": ours4["n"], "batch_size": args.batch_size,
                      "statements_per_s_source": src_rate, "statements_per_s_ours": ours_rate,
                      "statements_per_s_ours_4n": ours4["n"] / ours4["seconds"],
                      "statements_per_s_source_no_grad": src_ng and src_ng["n"] / src_ng["seconds"],
                      "extra_peak_mb": {"ours_n": ours["extra_peak_mb"], "ours_4n": ours4["extra_peak_mb"],
                                        "source": src["extra_peak_mb"]},
                      "max_abs_diff_vs_source": max_diff, "cities_best_layer": layer}, indent=2))
    print(f"RESULT cache_speedup={ours_rate / src_rate:.2f} memory_growth_4x={growth:.2f} cities_probe_acc={acc:.4f}")


if __name__ == "__main__":
    main()
