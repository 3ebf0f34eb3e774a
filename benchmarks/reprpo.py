"""ReprPO against the DPO baseline on the same model and batch: optimizer-step time and peak memory, and the check
that with the representation weight at 0 the ReprPO loss is TRL's DPO loss (issue #13).

    python benchmarks/reprpo.py [--hidden 256 --layers 4 --seq 128 --batch 4 --steps 6 --variants mse,topk,symlog]

Each method trains a LoRA adapter (r 16, all seven projections, gradient checkpointing, as the experiments) on a
tiny Llama scaled up by --hidden/--layers, in a fresh process per measurement (`training.memory.in_fresh_process`):
2 warm-up steps, then --steps timed optimizer steps. DPO is TRL 1.16's DPOTrainer (PreferenceTrainer, sigmoid);
ReprPO is ReprPOTrainer with each named loss variant, hidden states at two layers. Both run a policy and a
reference forward per micro-batch; ReprPO adds forward hooks, the hidden-state loss, and keeps the reference's
hidden states (no grad). Time: the median step, the best of --repeats alternating runs. Memory: the peak during
the timed steps above the memory held when they start (model, adapter, optimizer state: the same for both), i.e.
what a training step adds, on a GPU from `torch.cuda.max_memory_allocated`, on CPU from the peak RSS (glibc's mmap
threshold fixed low); the ratio of whole-process peaks is printed too. Goals: at most 1.10x the time and 1.15x
the memory of DPO, for the slowest / largest variant.

The source's ReprPO loss has no DPO term, so "representation weight 0" is made meaningful with the recipe's
options: `repr_weight: 0, dpo_weight: 1, loss_type: sigmoid` must give exactly TRL's `_compute_loss` on the same
batches (our DPO term is computed from our own policy/reference passes and hooks, TRL's from its own), with an
adapter moved away from zero so that the loss is not the trivial log 2. Last line:
RESULT reprpo_vs_dpo_time=<x> reprpo_vs_dpo_mem=<x> zero_weight_loss_diff=<x>
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from llmrepro.training import memory

HERE = Path(__file__).resolve()  # the measuring processes import this file as a module

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_config(p: dict):
    from llmrepro.lm.models import LoraSpec, ModelConfig

    h = p["hidden"]
    tiny = {"hidden_size": h, "intermediate_size": h * 8 // 3 // 32 * 32, "num_hidden_layers": p["layers"],
            "num_attention_heads": max(h // 64, 1), "num_key_value_heads": max(h // 64, 1),
            "initializer_range": 0.2}
    return ModelConfig(name="tiny-llama", tiny_config=tiny, lora=LoraSpec(r=16, alpha=16, rslora=True,
                                                                           target_modules=TARGETS))


def _pairs(n: int, words: int) -> list[dict]:
    """Synthetic pairs of about `words` words per completion, so that sequences are long enough to matter."""
    from llmrepro.lm.fixtures.facts import CAPITALS

    rows = []
    for i in range(n):
        city, country = CAPITALS[i % len(CAPITALS)]
        wrong = CAPITALS[(i + 5) % len(CAPITALS)][1]
        filler = " ".join(f"{c} is a city in {k}." for c, k in CAPITALS)[: words * 6]
        rows.append({"prompt": f"{filler} Which country is {city} in?",
                     "chosen": f" {city} is in {country}. {filler}", "rejected": f" {city} is in {wrong}. {filler}"})
    return rows


def build(p: dict, out_dir: str):
    """(trainer) for method p["method"]: "dpo" or a ReprPO loss variant."""
    import datasets
    import torch
    from transformers import PrinterCallback
    from trl import DPOConfig

    from llmrepro.lm.models import load_model, load_tokenizer, lora_config
    from llmrepro.training.preference_trainer import PreferenceTrainer, ReprPOTrainer, ReprSettings

    torch.manual_seed(0)
    mcfg = _model_config(p)
    tok = load_tokenizer(mcfg)
    model = load_model(mcfg.model_copy(update={"lora": None}))
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=p["batch"], max_steps=p["warmup"] + p["steps"],
                     learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, report_to=[], bf16=cuda,
                     max_length=None, save_strategy="no", disable_tqdm=True, gradient_checkpointing=True, seed=42,
                     loss_type=p.get("loss_type", "sigmoid"), dataloader_num_workers=0)
    common = dict(model=model, args=args, train_dataset=datasets.Dataset.from_list(_pairs(64, p["seq"] // 2)),
                  processing_class=tok, peft_config=lora_config(mcfg.lora),
                  source_tokenization=(p["seq"], p["seq"] // 2))
    if p["method"] == "dpo":
        trainer = PreferenceTrainer(**common)
    else:
        settings = ReprSettings(loss=p["method"], layers=(p["layers"] // 2, p["layers"]), alpha=1.0,
                                repr_weight=p.get("repr_weight", 1.0), dpo_weight=p.get("dpo_weight", 0.0),
                                loss_type=p.get("loss_type", "ipo"))
        trainer = ReprPOTrainer(**common, repr=settings)
    trainer.remove_callback(PrinterCallback)  # no per-step log lines on stdout
    return trainer


def measure(p: dict) -> dict:
    """Runs in a fresh process: step times and memory of one method."""
    import torch
    from transformers import TrainerCallback

    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == p["warmup"]:  # the timed steps start: optimizer state exists, peak reset
                memory.reset_peak()
                marks["start_mb"] = memory.current_mb()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > p["warmup"]:
                times.append(time.perf_counter() - marks["t"])

    with tempfile.TemporaryDirectory() as out:
        trainer = build(p, out)
        trainer.add_callback(Clock())
        trainer.train()
    peak = memory.peak_mb()
    return {"step_s": statistics.median(times), "peak_mb": peak, "step_mb": peak - marks["start_mb"]}


def zero_weight_diff(p: dict, batches: int = 4) -> float:
    """max |ReprPO loss (repr_weight 0, dpo_weight 1, sigmoid) - TRL's DPO loss| over a few batches."""
    import torch

    from llmrepro.training.preference_trainer import PreferenceTrainer

    with tempfile.TemporaryDirectory() as out:
        trainer = build({**p, "method": "mse", "repr_weight": 0.0, "dpo_weight": 1.0, "loss_type": "sigmoid"}, out)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, w in trainer.model.named_parameters():
                if "lora_B" in name:
                    w.copy_((torch.randn(w.shape, generator=g) * 0.05).to(w))
        trainer.model.train()
        diffs = []
        for i, batch in enumerate(trainer.get_train_dataloader()):
            if i == batches:
                break
            batch = trainer._prepare_inputs(batch)
            with torch.no_grad():
                ours = trainer.compute_loss(trainer.model, batch)
                trl = PreferenceTrainer._compute_loss(trainer, trainer.model, batch, return_outputs=False)
            diffs.append(abs(float(ours) - float(trl)))
            print(f"  batch {i}: ReprPO(weight 0) {float(ours):.8f}  TRL DPO {float(trl):.8f}", flush=True)
    return max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="max tokens of prompt + completion")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="mse,topk,symlog", help="comma-separated ReprPO losses, or 'all'")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per measured process (OMP_NUM_THREADS)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from llmrepro.lm.models import default_device
    from llmrepro.training.preference import REPR_LOSSES

    variants = list(REPR_LOSSES) if args.variants == "all" else args.variants.split(",")
    base = {"hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup}
    runs: dict[str, list[dict]] = {m: [] for m in ["dpo", *variants]}
    for r in range(args.repeats):
        for method in runs:  # alternate, so that a slow moment of a shared machine hits every method
            runs[method].append(memory.in_fresh_process(f"{HERE.stem}:measure", {**base, "method": method},
                                                        env={"PYTHONPATH": str(HERE.parent)}))
            print(f"repeat {r + 1}: {method} {runs[method][-1]}", flush=True)
    best = {m: {"step_s": min(x["step_s"] for x in v), "step_mb": min(x["step_mb"] for x in v),
                "peak_mb": min(x["peak_mb"] for x in v)} for m, v in runs.items()}
    dpo = best["dpo"]
    print(f"\n{default_device()}: hidden {args.hidden}, {args.layers} layers, batch {args.batch} pairs, "
          f"<= {args.seq} tokens\n")
    print(f"{'method':16} {'step s':>8} {'x DPO':>7} {'step MB':>9} {'x DPO':>7} {'peak MB':>9} {'x DPO':>7}")
    for m, b in best.items():
        print(f"{m:16} {b['step_s']:8.3f} {b['step_s'] / dpo['step_s']:7.3f} {b['step_mb']:9.1f} "
              f"{b['step_mb'] / dpo['step_mb']:7.3f} {b['peak_mb']:9.1f} {b['peak_mb'] / dpo['peak_mb']:7.3f}")
    time_ratio = max(best[v]["step_s"] for v in variants) / dpo["step_s"]
    mem_ratio = max(best[v]["step_mb"] for v in variants) / dpo["step_mb"]
    print("\nzero representation weight vs TRL's DPO loss:")
    diff = zero_weight_diff(base)
    print(f"\ngoals: time <= 1.10x ({time_ratio:.3f}), step memory <= 1.15x ({mem_ratio:.3f}), "
          f"loss difference <= 1e-6 ({diff:.2e})")
    print(f"RESULT reprpo_vs_dpo_time={time_ratio:.3f} reprpo_vs_dpo_mem={mem_ratio:.3f} "
          f"zero_weight_loss_diff={diff:.2e}")


if __name__ == "__main__":
    main()
