"""instruct-sft: instruction fine-tuning of a causal LM with the Dolly prompt and completion-only loss.

Reproduces the instruction-tuning project (Pythia and others on Dolly, Alpaca, Alpaca-cleaned, HC3 and
Evol-Instruct), which followed databricks' Dolly trainer: the prompt template below, the keys added to the
tokenizer as special tokens (embeddings resized), samples at or over `max_length` dropped, a held-out
eval split of `test_size` rows, and defaults lr 5e-6, batch 16, 50 warmup steps, eval every 50 steps.

Deliberate differences from the source, all bug fixes:
- The response key is matched on its whole token-id sequence, not on its first token only, so a key
  that tokenizes to several ids (a tokenizer without the added special tokens) still masks correctly.
- Padding is excluded from the loss through the attention mask, not by `labels == pad_token_id`: the
  source set pad = eos, so the end-of-text token was never learnt.
- A sample whose response key is missing is dropped (and counted) instead of crashing the run mid-way.

Training is `transformers.Trainer`; this module only supplies the data and the collator.
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

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "training" / "deepspeed"  # zero2.json, zero3.json
CATEGORY_FILTERS = {"summarization": {"summarization"}, "qa_only": {"open_qa", "closed_qa", "general_qa"}}


class TrainConfig(Strict):
    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    warmup_steps: int = Field(50, ge=0)
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int = Field(1, ge=1)
    logging_steps: int = Field(10, ge=1)
    max_length: int = Field(1024, ge=16)
    bf16: bool = False
    deepspeed: str | None = None  # zero2 | zero3 (the shipped ZeRO configs) or a DeepSpeed JSON file; needs deepspeed


class Config(RecipeConfig):
    model: ModelConfig
    data: DataConfig
    test_size: int = Field(200, ge=1)
    category_filter: Literal["summarization", "qa_only"] | None = None  # Dolly only
    hc3_answers: Literal["human", "chatgpt"] = "human"  # which HC3 answers are the responses
    train: TrainConfig = TrainConfig()
    save_model: bool = True

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


class CompletionOnlyCollator:
    """Pads a batch and sets labels to -100 on padding and on everything up to and including the response key."""

    def __init__(self, tokenizer, response_key_ids: list[int]):
        self.tokenizer, self.key = tokenizer, response_key_ids

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt")
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


def build_examples(rows: list[dict], cfg: Config, tokenizer) -> tuple[list[dict], dict]:
    """Tokenized examples and counts of what was filtered out (category, too long, no response key)."""
    key = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    keep_categories = CATEGORY_FILTERS.get(cfg.category_filter)
    examples, dropped = [], {"category": 0, "too_long": 0, "no_response_key": 0}
    for row in rows:
        rec = data.to_instruction(row, cfg.data.format, cfg.hc3_answers)
        if keep_categories is not None and rec["category"] not in keep_categories:
            dropped["category"] += 1
            continue
        ids = tokenizer.encode(dolly_prompt(rec["instruction"], rec["response"], rec["input"]),
                               add_special_tokens=False, truncation=True, max_length=cfg.train.max_length)
        if len(ids) >= cfg.train.max_length:
            dropped["too_long"] += 1
        elif find_subsequence(ids, key) is None:
            dropped["no_response_key"] += 1
        else:
            examples.append({"input_ids": ids})
    return examples, dropped


def run(cfg: Config, ctx) -> dict:
    import datasets
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from llmrepro.training import memory

    tokenizer = load_tokenizer(cfg.model)
    rows = data.load_rows(cfg.data, ctx)
    model = load_model(cfg.model, ctx=ctx)
    tokenizer.add_special_tokens({"additional_special_tokens": [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]})
    model.resize_token_embeddings(len(tokenizer))

    examples, dropped = build_examples(rows, cfg, tokenizer)
    if len(examples) <= cfg.test_size:
        raise UserError(f"{cfg.data.name}: {len(examples)} usable samples, not more than test_size={cfg.test_size} "
                        f"(dropped: {dropped}); lower test_size or use more data")
    split = datasets.Dataset.from_list(examples).train_test_split(test_size=cfg.test_size, seed=cfg.seed)
    ctx.log.info("%d train / %d eval samples; dropped %s", len(split["train"]), len(split["test"]), dropped)

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(ctx.dir / "checkpoints"), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay, eval_strategy="steps",
        eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, bf16=t.bf16, report_to=["wandb"] if ctx.tracking else [],
        disable_tqdm=not progress_enabled(), remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        deepspeed=str(DEEPSPEED_CONFIGS / f"{t.deepspeed}.json") if t.deepspeed in ("zero2", "zero3") else t.deepspeed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                      data_collator=CompletionOnlyCollator(tokenizer, tokenizer.encode(RESPONSE_KEY_NL,
                                                                                       add_special_tokens=False)))
    trainer.remove_callback(PrinterCallback)  # Trainer's logs go to run.log, not stdout
    trainer.add_callback(log_to_run(ctx.log))
    resumable = ctx.resume and (ctx.dir / "checkpoints").is_dir()
    checkpoint = get_last_checkpoint(str(ctx.dir / "checkpoints")) if resumable else None
    if checkpoint and cfg.model.lora is None:
        # transformers 5 saves some architectures under legacy weight names (GPT-NeoX: embed_out) that Trainer's
        # resume does not map back, leaving lm_head at its initial values; from_pretrained maps them.
        model.load_state_dict(type(model).from_pretrained(checkpoint, dtype=model.dtype).state_dict())
    memory.reset_peak()
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
        "train_samples": len(split["train"]),
        "eval_samples": len(split["test"]),
        "dropped_samples": sum(dropped.values()),
        "tokens_per_s": tokens_per_epoch * trainer.state.epoch / result.metrics["train_runtime"],
        "train_time_s": result.metrics["train_runtime"],
        "peak_memory_mb": memory.peak_mb(),
    }
    if cfg.save_model:
        trainer.save_model(str(ctx.dir / "model"))  # every rank calls it (ZeRO-3 gathers); rank 0 writes
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(ctx.dir / "model"))
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.state.global_step)
    return metrics
