"""memory-efficiency: peak memory, memory timeline and step time of fine-tuning with standard backprop or
with the optimizer step fused into backward (`llmrepro.training.fused_optimizer`).

Reproduces the DTU thesis' memory experiments: OPT-125m and Llama-2-7B fine-tuned on LIMA, batch 1,
sequence 256, 10 batches, gradient checkpointing, with backprop + SGD, backprop + Adam, fused + SGD,
fused + Adam, and Adam + LoRA (r 16, alpha 8, q/k/v/o, dropout 0.05) on an 8-bit bitsandbytes model.
Measured: the memory timeline of the first `profile_steps` steps by category (torch profiler, as in the
source), the peak over the remaining steps, and their mean step time.

Where it deliberately differs from the source:
- Peak memory on a GPU is `torch.cuda.max_memory_allocated`. Without a GPU the training runs in a fresh
  process (`memory.in_fresh_process`) and the peak is its resident set size, with glibc's mmap
  threshold fixed low so RSS tracks live tensors; the profiler's live-tensor peak is reported as well.
- Every sample is padded or truncated to exactly `max_length` tokens, so all steps have one shape and the
  peak does not depend on which samples came last. Padding is excluded from the loss.
- LIMA is chat data; a tokenizer without a chat template (OPT, Llama-2 base) gets the Tulu template.
- On CUDA both methods use torch's fused optimizer kernels (`fused=True`). The source used the default
  multi-tensor (foreach) step, whose temporaries add about one parameter-sized buffer at the peak (+23%
  for Adam on an H100) and which, fused into backward, would launch ~10 small kernels per parameter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmrepro.core.config import RecipeConfig, Strict
from llmrepro.core.errors import UserError
from llmrepro.lm import data, templates
from llmrepro.lm.data import DataConfig
from llmrepro.lm.models import ModelConfig, default_device, load_model, load_tokenizer, quantization_config
from llmrepro.training.optimizers import SCHEDULERS, optimizer_class, unsupported


class TrainConfig(Strict):
    method: Literal["backprop", "fused"] = "backprop"
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "linear"  # a transformers scheduler name; it drives the fused optimizer's lr too
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    steps: int = Field(10, ge=1)  # optimizer steps (batches, times gradient_accumulation_steps)
    profile_steps: int = Field(2, ge=0)  # the first steps, run under the memory profiler (timeline)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(None, gt=0)  # gradient clipping; backprop only
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; fp16 adds a GradScaler (backprop only)

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; use one of {', '.join(SCHEDULERS)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.profile_steps >= self.steps:
            raise ValueError(f"profile_steps ({self.profile_steps}) must be below steps ({self.steps}): "
                             "the steps after them are timed")
        if self.method == "fused" and (why := unsupported(
                gradient_accumulation_steps=self.gradient_accumulation_steps, max_grad_norm=self.max_grad_norm,
                grad_scaling=self.mixed_precision == "fp16", distributed=int(os.environ.get("WORLD_SIZE", 1)) > 1)):
            raise ValueError(why)
        return self


class Config(RecipeConfig):
    model: ModelConfig
    data: DataConfig
    only_dataset: str | None = None  # keep rows whose "dataset" column equals this (Tulu v2 mixture: "lima")
    train: TrainConfig = TrainConfig()

    @field_validator("data")
    @classmethod
    def _chat_data(cls, v: DataConfig) -> DataConfig:
        if v.format != "chat":
            raise ValueError("memory-efficiency fine-tunes on chat data (LIMA): use format chat")
        return v

    @model_validator(mode="after")
    def _quantized_needs_lora(self):
        if self.model.quantization and self.model.lora is None:
            raise ValueError("a quantized model cannot be fine-tuned in full: add model.lora (as in the source)")
        return self


def encode(rows: list[dict], tokenizer, max_length: int) -> dict:
    """input_ids, attention_mask, labels (padding -> -100), each (N, max_length)."""
    template = None if tokenizer.chat_template else templates.TULU_CHAT_TEMPLATE
    texts = [tokenizer.apply_chat_template(r["messages"], chat_template=template, tokenize=False) for r in rows]
    enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def build_optimizer(params: list, t: TrainConfig):
    from llmrepro.training.fused_optimizer import FusedOptimizer

    cls = optimizer_class(t.optimizer)
    kwargs = {"lr": t.learning_rate, "weight_decay": t.weight_decay}
    if params[0].is_cuda:
        # torch's fused kernels for both methods: the default multi-tensor (foreach) step allocates a
        # parameter-sized temporary, and a per-parameter step would launch ~10 small kernels instead of one.
        kwargs["fused"] = True
    return FusedOptimizer(params, cls, **kwargs) if t.method == "fused" else cls(params, **kwargs)


class _Inputs:
    """Collects `record_input` calls in the measuring process, for the run's manifest."""

    def __init__(self):
        self.records = []

    def record_input(self, kind: str, name: str, **details) -> None:
        self.records.append([kind, name, details])


def measure(args: dict) -> dict:
    """Fine-tune as configured and measure; runs in a fresh process on CPU. args: {config, out_dir}."""
    import torch
    from transformers import get_scheduler, set_seed

    from llmrepro.training import memory

    cfg, out = Config.model_validate(args["config"]), Path(args["out_dir"])
    t = cfg.train
    inputs, device = _Inputs(), default_device()
    tokenizer = load_tokenizer(cfg.model)
    rows = data.load_rows(cfg.data, inputs)
    if cfg.only_dataset is not None:
        rows = [r for r in rows if r.get("dataset") == cfg.only_dataset]
        if not rows:
            raise UserError(f"{cfg.data.name}: no rows with dataset == {cfg.only_dataset!r}")
    enc = encode(rows, tokenizer, t.max_length)
    n, micro = len(enc["input_ids"]), t.steps * t.gradient_accumulation_steps
    order = itertools.islice(itertools.cycle(range(n)), micro * t.batch_size)
    index = torch.tensor(list(order)).view(micro, t.batch_size)
    batches = iter([{k: v[i].to(device) for k, v in enc.items()} for i in index])

    model = load_model(cfg.model, ctx=inputs)
    if cfg.model.quantization is None:
        model.to(device)
    model.train()
    set_seed(cfg.seed)  # after loading: building a tiny model on first use draws from the generator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)
    scaler = torch.amp.GradScaler(device) if t.mixed_precision == "fp16" else None
    autocast = (torch.autocast(device, dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[t.mixed_precision]))
                if t.mixed_precision != "no" else contextlib.nullcontext())
    model_mb = memory.current_mb()

    def step() -> tuple[float, float, float]:
        """(loss, seconds, MB added by the forward pass) of one optimizer step."""
        start, total, forward_mb = time.perf_counter(), 0.0, 0.0
        for _ in range(t.gradient_accumulation_steps):
            before = memory.current_mb()
            with autocast:
                loss = model(**next(batches)).loss / t.gradient_accumulation_steps
            forward_mb = max(forward_mb, memory.current_mb() - before)
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(optimizer)
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return total, time.perf_counter() - start, forward_mb

    losses, metrics = [], {}
    if t.profile_steps:
        with memory.profiler() as prof:
            losses += [step()[0] for _ in range(t.profile_steps)]
        times, by_category = memory.timeline(prof)
        del prof
        (out / "memory_timeline.json").write_text(json.dumps({"time_ms": times, "mb": by_category}))
        memory.plot_timeline(times, by_category, out / "memory_timeline.png",
                                     f"{cfg.model.name}: {t.method} + {t.optimizer}, first {t.profile_steps} steps")
        metrics.update({f"timeline_peak_{k}_mb": v for k, v in memory.peak_breakdown(by_category).items()})
    memory.reset_peak()
    start_mb = memory.current_mb()
    timed = [step() for _ in range(t.steps - t.profile_steps)]
    peak = memory.peak_mb()  # since memory.reset_peak above
    losses += [loss for loss, _, _ in timed]

    trainable = [p.numel() * p.element_size() / memory.MB for p in params]
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": t.steps,
        "step_time_s": sum(s for _, s, _ in timed) / len(timed),
        "peak_memory_mb": peak,
        "model_memory_mb": model_mb,
        "peak_above_model_mb": peak - model_mb,
        "timed_start_mb": start_mb,  # memory when the timed steps began (parameters, optimizer state, ...)
        "activation_mb": max(a for _, _, a in timed),
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / memory.MB,
        "trainable_param_mb": sum(trainable),
        "largest_grad_mb": max(trainable),
        "optimizer_state_mb": state / memory.MB,
        **metrics,
        "inputs": inputs.records,
    }


def run(cfg: Config, ctx) -> dict:
    from llmrepro.training import memory

    args = {"config": cfg.model_dump(mode="json"), "out_dir": str(ctx.dir)}
    if default_device() == "cuda":
        result = measure(args)
    else:
        quantization_config(cfg.model)  # 8-bit/4-bit without a GPU: the one-line error now, before spawning
        ctx.log.info("no GPU: measuring in a fresh process (peak resident memory)")
        result = memory.in_fresh_process(f"{__name__}:measure", args)
    for kind, name, details in result.pop("inputs"):
        ctx.record_input(kind, name, **details)
    ctx.log_metrics(result, step=cfg.train.steps)
    return result
