"""Benchmark: `llmrepro plan`'s predicted peak memory against the measured peak of the real instruct-sft training
step, over a grid of 16 configurations, and the planner's own time.

    python benchmarks/memory_planner.py [--hidden 256] [--layers 6] [--batches 2 4] [--lengths 128 256]

- model: tiny-pythia widened (hidden 256, 6 layers, MLP 1024: 5.3M parameters), so that the planner extrapolates
  it from 2- and 3-block fake steps, as it does the real Pythias;
- grid: full fine-tuning / LoRA (r 16 on query_key_value) x gradient checkpointing off / on x 2 batch sizes x 2
  sequence lengths; float32, no DeepSpeed (what runs on CPU);
- measured: in a fresh process per configuration, the recipe's own pieces (lm.models.load_model,
  instruct_sft's collator and Trainer subclass, transformers' Trainer with its fused AdamW, clipping 1.0) train 2
  steps on samples of length-1 tokens (padded to a multiple of 8: every batch is padded, as real batches are).
  The peak is allocator-level: on CPU the running sum of the torch profiler's allocation events from before the
  model is built (tensor bytes, not RSS); on a GPU torch.cuda.max_memory_allocated;
- plus 2 rows of DeepSpeed ZeRO-2 (the shipped zero2.json) over two CPU processes under torchrun (gloo), full
  fine-tuning at the larger batch and length, checkpointing off / on: measured as the larger rank's peak,
  predicted with the planner's ZeRO accounting for 2 devices (`--no-zero` skips them);
- predicted: `training.planning.api.plan_params` on the same instruct-sft parameters, device CPU (no reserve);
- plan_seconds: the slowest configuration's planning time from a cold cache (fresh cache directory, in-process
  caches cleared), plus the Pythia-12B (ZeRO-3, 8 GPUs) plan, timed the same way, in its own line.

Goals (issue 14): every prediction within 10%, the median within 5%, under 30 s per plan on 2 cores.
Last line: RESULT median_rel_error=<x> max_rel_error=<x> plan_seconds=<x>
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["query_key_value"]}


def params_for(c: dict) -> dict:
    """instruct-sft parameters of one configuration."""
    model = {"name": "tiny-pythia", "tiny_config": c["tiny_config"], "gradient_checkpointing": c["checkpointing"],
             "lora": LORA if c["lora"] else None}
    return {"model": model, "data": {"name": "fixture:dolly", "format": "dolly"}, "test_size": 1,
            "train": {"batch_size": c["batch"], "max_length": c["length"], "max_steps": 2, "bf16": False,
                      "deepspeed": None, "pad_to_multiple_of": 8}}


def measure(c: dict) -> int:
    """Peak allocated bytes of 2 real training steps of configuration `c` (run in a fresh process)."""
    import datasets
    import torch
    from transformers import TrainingArguments

    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
    from llmrepro.lm.templates import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL
    from llmrepro.recipes.instruct_sft import DEEPSPEED_CONFIGS, CompletionOnlyCollator, dolly_trainer
    from llmrepro.training import memory

    if c.get("zero2"):  # DeepSpeed on CPU: gloo collectives, no JIT-compiled shared-memory op
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    p = params_for(c)
    cfg = ModelConfig(**p["model"])
    tokenizer = load_tokenizer(cfg)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]})
    key = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    n = c["length"] - 1  # < max_length, as the recipe keeps; padded to a multiple of 8 = max_length
    rows = [{"input_ids": [*torch.randint(0, 900, (10,), generator=gen).tolist(), *key,
                           *torch.randint(0, 900, (n - 10 - len(key),), generator=gen).tolist()]}
            for _ in range(4 * c["batch"])]
    train = datasets.Dataset.from_list(rows)

    def steps():
        model = load_model(cfg)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=c["batch"], max_steps=2,
                                 learning_rate=1e-4, warmup_steps=1, logging_steps=1, eval_strategy="no",
                                 save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
                                 dataloader_num_workers=0, dataloader_pin_memory=False, bf16=False,
                                 use_cpu=not torch.cuda.is_available(), average_tokens_across_devices=False,
                                 deepspeed=str(DEEPSPEED_CONFIGS / "zero2.json") if c.get("zero2") else None)
        trainer = dolly_trainer(1, True)(model=model, args=args, train_dataset=train,
                                         data_collator=CompletionOnlyCollator(tokenizer, key, 8))
        trainer.train()
        assert bool(c.get("zero2")) == (trainer.accelerator.distributed_type == "DEEPSPEED")

    peak, _ = memory.peak_allocated(steps)
    if c.get("zero2"):
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return peak


def _cold() -> None:
    """No measured step cached, in memory or on disk."""
    import shutil

    from llmrepro.core import io
    from llmrepro.training.planning import measure as m

    m.measure.cache_clear()
    shutil.rmtree(io.cache_dir() / "planner", ignore_errors=True)


def predict(c: dict) -> tuple[int, float]:
    """(predicted peak bytes per process, seconds to plan from a cold cache)."""
    from llmrepro.core.catalog import Resources
    from llmrepro.training.planning import api, estimate, workloads

    _cold()
    start = time.perf_counter()
    params = params_for(c)
    if not c.get("zero2"):
        plan = api.plan_params("benchmark", "instruct-sft", params, None, Resources(), gpus=0, search=False)
        return plan.estimate.breakdown.total, time.perf_counter() - start
    # two CPU processes under ZeRO-2 (plan's devices are GPUs; on CPU it plans one process)
    params["train"]["deepspeed"] = "zero2"
    config, _ = api.model_config(params["model"])
    w = workloads.workload("instruct-sft", params, api.max_length_of(config))
    e = estimate.estimate(w, api._config_json(config), config["hidden_size"], 2, "cpu")
    return e.breakdown.total, time.perf_counter() - start


def measure_in_fresh_processes(c: dict) -> int:
    """The measured peak: one fresh process, or (ZeRO-2) the larger of two torchrun ranks'."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if c.get("zero2") else "2"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if c.get("zero2") else \
        [sys.executable]
    done = subprocess.run([*launcher, __file__, "--measure", json.dumps(c)], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    peaks = [json.loads(line)["peak"] for line in done.stdout.splitlines() if line.startswith('{"peak"')]
    return max(peaks)


def plan_12b_seconds() -> float:
    from llmrepro.training.planning import api

    _cold()
    start = time.perf_counter()
    api.plan("instruct/dolly-pythia-12b")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs=2, default=[128, 256])
    parser.add_argument("--no-zero", action="store_true", help="skip the two ZeRO-2 rows (torchrun, 2 processes)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one configuration as JSON, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"peak": measure(json.loads(args.measure))}), flush=True)
        return 0

    os.environ["LLMREPRO_CACHE"] = os.environ.get("LLMREPRO_CACHE") or tempfile.mkdtemp(prefix="llmrepro-bench-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LLMREPRO_PROGRESS", "0")
    tiny_config = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "intermediate_size": 4 * args.hidden}
    grid = [{"tiny_config": tiny_config, "lora": lora, "checkpointing": ckpt, "batch": b, "length": t}
            for lora, ckpt, b, t in itertools.product([False, True], [False, True], args.batches, args.lengths)]
    print(f"{'method':<6} {'ckpt':<5} {'batch':>5} {'seq':>5} {'predicted MiB':>14} {'measured MiB':>13} "
          f"{'error':>8} {'plan s':>7}")
    if not args.no_zero:  # DeepSpeed ZeRO-2 over two CPU processes (gloo), full fine-tuning, checkpointing off/on
        grid += [{**c, "zero2": True} for c in grid if not c["lora"] and c["batch"] == args.batches[1]
                 and c["length"] == args.lengths[1]]
    errors, seconds = [], []
    for c in grid:
        try:
            measured = measure_in_fresh_processes(c)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        predicted, took = predict(c)
        error = predicted / measured - 1
        errors.append(abs(error))
        seconds.append(took)
        method = "zero2" if c.get("zero2") else "lora" if c["lora"] else "full"
        print(f"{method:<6} {'on' if c['checkpointing'] else 'off':<5} {c['batch']:>5} "
              f"{c['length']:>5} {predicted / 2**20:>14.2f} {measured / 2**20:>13.2f} {100 * error:>7.2f}% "
              f"{took:>7.2f}", flush=True)
    big = plan_12b_seconds()
    print(f"plan of instruct/dolly-pythia-12b (ZeRO-3, 8 GPUs) from a cold cache: {big:.1f} s")
    print(f"RESULT median_rel_error={statistics.median(errors):.4f} max_rel_error={max(errors):.4f} "
          f"plan_seconds={max([*seconds, big]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
