"""instruct-sft: instruction fine-tuning of a causal LM as databricks' Dolly trainer does it.

Reproduces the instruction-tuning project, which fine-tuned Pythia (1.4B to 12B) on Dolly-15k and other
instruction sets with databricks' Dolly trainer (databrickslabs/dolly @ e2d664d: `training/consts.py`,
`training/trainer.py`, `train_dolly.py`, `config/a100_config.json`). As the source:
- text: Dolly's template (`lm.templates.dolly_prompt`, consts.py), pad = eos, the end, instruction and
  response keys added as special tokens and the embeddings resized to the tokenizer (trainer.py:120-143);
- samples tokenized with truncation at the model's maximum length (the first of `n_positions`,
  `max_position_embeddings`, `seq_length`, else 1024: 2048 for Pythia; trainer.py:213-222), those not
  strictly shorter dropped (trainer.py:171), the rest shuffled (seed 42) and split into train and `test_size`
  test rows with the same seed (trainer.py:175, 226);
- loss on the response only: labels up to and including the response key are -100; batches padded to a
  multiple of 8 (trainer.py:48-77, 231);
- training as train_dolly.py:155-171 passes it: 2 epochs, per-device batch 6 (the A100 setting; A10: 4,
  V100: 3), eval every 50 steps, log every 10, checkpoint every 200 (20 kept), lr 5e-6 under DeepSpeed's
  WarmupLR (log warm-up over 50 steps, then constant), AdamW (weight decay 0, betas 0.9/0.999, eps 1e-8),
  gradient clipping 1.0, gradient checkpointing, and bf16 compute with fp32 master weights: the model is
  loaded in float32 and DeepSpeed (`train.deepspeed: zero3`, a100_config.json's settings) casts the module to
  bf16 while its ZeRO-3 optimizer keeps fp32 masters and fp32 Adam moments. The loss is each rank's own
  token mean, averaged over ranks (`average_tokens_across_devices: false`, transformers 4.x's behaviour).

Deliberate differences from the source:
- Bug fix: the response key is matched on its whole token-id sequence, not on its first token (for Pythia the
  key is one added token, so the masks are the same; for a tokenizer that prepends BOS the source matched BOS
  at position 0 and trained on the whole prompt).
- Bug fix: padding is left out of the loss through the attention mask, not by `labels == pad_token_id`. With
  pad = eos the source would also mask a real end-of-text token, but neither side appends one, so the masked
  positions are the same unless a text contains a literal `<|endoftext|>`.
- A sample whose response key is missing (after the length filter it cannot be, for these templates) is
  dropped and counted, not a crash mid-run; a row with an empty instruction or response (HC3 questions without
  an answer; Dolly-15k has none) is dropped and counted, where the source raises ValueError.
- Tokenized without the tokenizer's special tokens (`add_special_tokens=False`); the source used the default.
  GPT-NeoX adds none, so the ids are the same for Pythia.
- Environment, DeepSpeed 0.19 (the source ran 0.8.3, `requirements.txt`): WarmupLR runs the first optimizer
  step at lr 0 (0.8.3 ran it at the full lr: step 1 of about 618); ZeRO reduces bf16 gradients in bf16 (0.8.3
  in fp16); the bf16 cast leaves float32 buffers (GPT-NeoX's rotary inv_freq) in float32 (0.8.3 cast the whole
  module); the DeepSpeed optimizer is torch's AdamW (`torch_adam`), the same update as the FusedAdam the
  source got, because FusedAdam and DeepSpeedCPUAdam are built from C++/CUDA sources at first use and the
  images carry no compiler.
- Environment, transformers 5: the loss is computed on logits upcast to float32; the embedding resize uses
  transformers 4's init (`mean_resizing=False`); the per-rank sample order comes from accelerate's sampler.
- Without DeepSpeed (`train.deepspeed: null`, the smoke profiles on CPU) the same schedule comes from a
  LambdaLR that replicates WarmupLR, and `bf16: true` means autocast over float32 weights, not DeepSpeed's
  all-bf16 module.
- Additions: a final evaluation, resumable runs, the project's Dolly category subsets (`category_filter`), no
  tensorboard logs, and `train.memory_cap_mb` with `expect: oom` for the out-of-memory reproduction.

Training is `transformers.Trainer` (subclassed only for the WarmupLR schedule); this module supplies the data
and the collator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from llmrepro.core.config import RecipeConfig, Strict
from llmrepro.core.errors import UserError
from llmrepro.core.progress import enabled as progress_enabled
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
from llmrepro.lm.templates import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL, dolly_prompt

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "training" / "deepspeed"
# name -> shipped DeepSpeed config: zero3 = dolly's a100_config.json, zero3_offload = its a10/v100 configs (CPU
# optimizer offload), zero2 = ours (no dolly counterpart; runs on CPU with gloo)
SHIPPED_DEEPSPEED = ("zero2", "zero3", "zero3_offload")
WITH_WARMUP_LR = ("zero3", "zero3_offload")  # configs that carry DeepSpeed's own WarmupLR scheduler block
CATEGORY_FILTERS = {"summarization": {"summarization"}, "qa_only": {"open_qa", "closed_qa", "general_qa"}}
LENGTH_SETTINGS = ("n_positions", "max_position_embeddings", "seq_length")  # trainer.py:216, in this order
SCHEDULERS = ("warmup_log", "linear", "cosine", "constant", "constant_with_warmup")


class TrainConfig(Strict):
    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(6, ge=1)  # per device, train and eval (train_dolly.py: 6 on A100, 4 on A10, 3 on V100)
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(2.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    warmup_steps: int = Field(50, ge=0)
    lr_scheduler: Literal[SCHEDULERS] = "warmup_log"  # warmup_log: DeepSpeed's WarmupLR; others: transformers'
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int = Field(20, ge=1)
    logging_steps: int = Field(10, ge=1)
    max_length: int | None = Field(None, ge=16)  # None: the model's (2048 for Pythia), as the source
    pad_to_multiple_of: int | None = Field(8, ge=1)
    bf16: bool = True
    fp16: bool = False  # the source's V100 setting (bf16 false)
    # zero2 | zero3 | zero3_offload (the shipped configs) or a DeepSpeed JSON file; needs deepspeed
    deepspeed: str | None = "zero3"
    average_tokens_across_devices: bool = False  # True: one token mean over all ranks (transformers 5's default)
    # device memory the run may use, in MB (None: all of it): CUDA through the caching allocator's fraction, CPU by
    # counting live tensor bytes per op; the allocation past it raises torch.OutOfMemoryError (training.planning.oom)
    memory_cap_mb: float | None = Field(None, gt=0)

    def model_post_init(self, _) -> None:
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 are exclusive (the source's V100 setting: bf16 false, fp16 true)")
        if self.deepspeed in WITH_WARMUP_LR and self.lr_scheduler != "warmup_log":
            raise ValueError(f"train.deepspeed={self.deepspeed} carries DeepSpeed's WarmupLR scheduler (as the "
                             f"source's configs): lr_scheduler must be warmup_log, not {self.lr_scheduler}")

    def deepspeed_config(self) -> str | None:
        """The DeepSpeed JSON file to train with, or None."""
        if self.deepspeed in SHIPPED_DEEPSPEED:
            return str(DEEPSPEED_CONFIGS / f"{self.deepspeed}.json")
        return self.deepspeed


class Config(RecipeConfig):
    model: ModelConfig
    data: DataConfig
    test_size: int = Field(200, ge=1)
    category_filter: Literal["summarization", "qa_only"] | None = None  # Dolly only
    hc3_answers: Literal["human", "chatgpt"] = "human"  # which HC3 answers are the responses
    train: TrainConfig = TrainConfig()
    save_model: bool = True
    # the outcome the experiment documents: oom for the out-of-memory reproduction (`llmrepro smoke` passes it
    # when the run ends with status oom)
    expect: Literal["complete", "oom"] = "complete"

    @field_validator("data")
    @classmethod
    def _instruction_data(cls, v: DataConfig) -> DataConfig:
        if v.format not in ("dolly", "alpaca", "hc3", "evol-instruct"):
            raise ValueError("instruct-sft needs instruction data: format dolly, alpaca, hc3 or evol-instruct")
        return v

    def model_post_init(self, _) -> None:
        if self.category_filter and self.data.format != "dolly":
            raise ValueError(f"category_filter applies to Dolly data only, not format {self.data.format}")


def find_subsequence(seq: list[int], sub: list[int]) -> int | None:
    """Index of the first occurrence of `sub` in `seq`, or None."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return None


def model_max_length(model_config) -> int:
    """The source's maximum length: the first set of n_positions, max_position_embeddings, seq_length; else 1024."""
    for name in LENGTH_SETTINGS:
        if value := getattr(model_config, name, None):
            return value
    return 1024


def warmup_log_factor(warmup_steps: int):
    """The lr factor of DeepSpeed's WarmupLR (warmup_type log, min lr 0) at scheduler step s, as a LambdaLR's.

    WarmupLR sets gamma = ln(i + 1) / ln(W) for i < W (W = max(2, warmup_steps)), else 1, where i is the number of
    scheduler steps taken before the optimizer step, less one; the constructor sets i = -1, lr 0. A LambdaLR's
    step s is that i + 1: factor 0 at s = 0, then min(1, ln(s) / ln(W)); the full lr from s = W on.
    """
    steps = max(2, warmup_steps)

    def factor(s: int) -> float:
        return 0.0 if s == 0 else min(1.0, math.log(s) / math.log(steps))

    return factor


class CompletionOnlyCollator:
    """Pads a batch (to a multiple of `pad_to_multiple_of`) and sets labels to -100 on padding and on everything
    up to and including the response key."""

    def __init__(self, tokenizer, response_key_ids: list[int], pad_to_multiple_of: int | None = None):
        self.tokenizer, self.key, self.multiple = tokenizer, response_key_ids, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt",
                                   pad_to_multiple_of=self.multiple)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for i, e in enumerate(examples):
            start = find_subsequence(e["input_ids"], self.key)
            if start is None:
                raise ValueError(f"response key {self.key} not found in example {i}")
            labels[i, : start + len(self.key)] = -100
        batch["labels"] = labels
        return {k: torch.as_tensor(v) for k, v in batch.items()}


def log_to_run(log):
    """A Trainer callback that writes each Trainer log (loss, lr, eval loss) to the run log."""
    from transformers import TrainerCallback

    class LogToRun(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            log.info("step %d: %s", state.global_step, logs)

    return LogToRun()


def dolly_trainer(warmup_steps: int, warmup_log: bool):
    """transformers.Trainer whose scheduler is DeepSpeed's WarmupLR (as a LambdaLR) when `warmup_log` is set;
    a DeepSpeed config with its own scheduler block replaces it with the real WarmupLR."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer

    class DollyTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if warmup_log and self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, warmup_log_factor(warmup_steps))
                self._created_lr_scheduler = True
            return super().create_scheduler(num_training_steps, optimizer)

    return DollyTrainer


def build_examples(rows: list[dict], cfg: Config, tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Tokenized examples (dataset order) and counts of what was filtered out."""
    key = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    keep_categories = CATEGORY_FILTERS.get(cfg.category_filter)
    examples, dropped = [], {"category": 0, "empty": 0, "too_long": 0, "no_response_key": 0}
    for row in rows:
        rec = data.to_instruction(row, cfg.data.format, cfg.hc3_answers)
        if keep_categories is not None and rec["category"] not in keep_categories:
            dropped["category"] += 1
            continue
        if not rec["instruction"] or not rec["response"]:
            dropped["empty"] += 1
            continue
        ids = tokenizer.encode(dolly_prompt(rec["instruction"], rec["response"], rec["input"]),
                               add_special_tokens=False, truncation=True, max_length=max_length)
        if len(ids) >= max_length:  # truncated (or exactly max_length): the source keeps len < max_length
            dropped["too_long"] += 1
        elif find_subsequence(ids, key) is None:
            dropped["no_response_key"] += 1
        else:
            examples.append({"input_ids": ids})
    return examples, dropped


def split_examples(examples: list[dict], test_size: int, seed: int):
    """The source's order: shuffle (seed), then train_test_split (same seed) -> DatasetDict train/test."""
    import datasets

    return datasets.Dataset.from_list(examples).shuffle(seed=seed).train_test_split(test_size=test_size, seed=seed)


def deepspeed_on_cpu() -> None:
    """What DeepSpeed needs to train on CPU (gloo) under torchrun, set before TrainingArguments.

    - accelerate's ACCELERATE_USE_CPU (set by `invoke slurm` for CPU jobs of several processes) makes accelerate skip
      its DeepSpeed setup without a word, so the run would be plain DDP; `use_cpu=True` asks for the CPU instead.
    - DeepSpeed's CPU accelerator compiles its shared-memory collectives (deepspeed_shm_comm) with g++ at the first
      init; marked incompatible, it uses plain gloo collectives (the same results) and needs no compiler.
    - Processes that end with the process group alive abort now and then at exit ("terminate called without an
      active exception"); it is destroyed at exit instead.
    """
    import atexit
    import os

    import deepspeed.ops
    import torch.distributed as dist

    os.environ.pop("ACCELERATE_USE_CPU", None)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    def shutdown() -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    atexit.register(shutdown)


def run(cfg: Config, ctx) -> dict:
    import torch
    from transformers import PrinterCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from llmrepro.training import memory
    from llmrepro.training.planning import oom

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.pad_token = tokenizer.eos_token  # trainer.py:123, always
    rows = data.load_rows(cfg.data, ctx)
    model = load_model(cfg.model, ctx=ctx)
    tokenizer.add_special_tokens({"additional_special_tokens": [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]})
    # Pythia's padded vocabulary shrinks here (no new rows); a model whose rows grow gets them from the model's init,
    # drawn right after seeding, so the run does not depend on what else ran in the process (building a tiny model)
    set_seed(cfg.seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    t = cfg.train
    max_length = t.max_length or model_max_length(model.config)
    examples, dropped = build_examples(rows, cfg, tokenizer, max_length)
    if len(examples) <= cfg.test_size:
        raise UserError(f"{cfg.data.name}: {len(examples)} usable samples, not more than test_size={cfg.test_size} "
                        f"(dropped: {dropped}); lower test_size or use more data")
    split = split_examples(examples, cfg.test_size, cfg.seed)
    ctx.log.info("max length %d; %d train / %d eval samples; dropped %s", max_length, len(split["train"]),
                 len(split["test"]), dropped)

    if t.deepspeed and not torch.cuda.is_available():
        deepspeed_on_cpu()
    args = TrainingArguments(
        output_dir=str(ctx.dir / "checkpoints"), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type="constant" if t.lr_scheduler == "warmup_log" else t.lr_scheduler,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, eval_strategy="steps",
        eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, bf16=t.bf16, fp16=t.fp16, report_to=["wandb"] if ctx.tracking else [],
        disable_tqdm=not progress_enabled(), remove_unused_columns=False,
        average_tokens_across_devices=t.average_tokens_across_devices,
        dataloader_num_workers=0, dataloader_pin_memory=False, deepspeed=t.deepspeed_config(),
        use_cpu=not torch.cuda.is_available(),
    )
    trainer_class = dolly_trainer(t.warmup_steps, t.lr_scheduler == "warmup_log")
    key = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    trainer = trainer_class(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                            processing_class=tokenizer,
                            data_collator=CompletionOnlyCollator(tokenizer, key, t.pad_to_multiple_of))
    trainer.remove_callback(PrinterCallback)  # Trainer's logs go to run.log, not stdout
    trainer.add_callback(log_to_run(ctx.log))
    resumable = ctx.resume and (ctx.dir / "checkpoints").is_dir()
    checkpoint = get_last_checkpoint(str(ctx.dir / "checkpoints")) if resumable else None
    if checkpoint and cfg.model.lora is None and t.deepspeed is None:
        # transformers 5 saves some architectures under legacy weight names (GPT-NeoX: embed_out) that Trainer's
        # resume does not map back, leaving lm_head at its initial values; from_pretrained maps them.
        model.load_state_dict(type(model).from_pretrained(checkpoint, dtype=model.dtype).state_dict())
    memory.reset_peak()
    with oom.guard(ctx.dir, t.memory_cap_mb, model, record=cfg.expect == "oom", log=ctx.log):
        result = trainer.train(resume_from_checkpoint=checkpoint)
        eval_metrics = trainer.evaluate()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens_per_epoch = sum(len(e["input_ids"]) for e in split["train"])
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "loss_first": losses[0] if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
        "steps": trainer.state.global_step,
        "max_length": max_length,
        "train_samples": len(split["train"]),
        "eval_samples": len(split["test"]),
        "dropped_samples": sum(dropped.values()),
        "tokens_per_s": tokens_per_epoch * trainer.state.epoch / result.metrics["train_runtime"],
        "train_time_s": result.metrics["train_runtime"],
        "peak_memory_mb": memory.peak_mb(),
    }
    if trainer.accelerator.distributed_type == "DEEPSPEED":  # DeepSpeed really trained (accelerate can skip it)
        metrics["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
    if cfg.save_model:
        trainer.save_model(str(ctx.dir / "model"))  # every rank calls it (ZeRO-3 gathers); rank 0 writes
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(ctx.dir / "model"))
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.state.global_step)
    return metrics
