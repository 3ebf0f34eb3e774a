"""memory-efficiency: the DTU thesis' fine-tuning runs for memory and time, standard backprop against the
optimizer step fused into backward (`llmrepro.training.fused_optimizer`), as `src/finetune.py` ran them.

    llmrepro run memory_efficiency/opt-125m-fused-sgd          # finetune.py --test True --profile True
    llmrepro run memory_efficiency/llama-2-7b-fused-sgd-time   # finetune.py --time_test True

What a run does, as the source (MikkelGodsk/Masters-thesis @ b51c7f1, `src/finetune.py`, `lima_utils.py`,
`model_factories.py`, `profiler_callbacks.py`, `backprop_trick.py`):
- Data: GAIR/lima `plain_text` train rows, multi-turn rows dropped, the first `rows` (10) of what is left.
  Each row is rendered with the model's template (Llama-2 `[INST] q [/INST] a </s>` without BOS in the text,
  the tokenizer adds it; OPT `q <SEP>a </s>` with `<SEP>` added as sep_token), tokenised with special tokens,
  truncated to `max_length` (256) and padded per batch to its longest row. The loss is completion-only: every
  token up to the end of the response marker (`[/INST]`, `<SEP>`) is masked, as trl's
  DataCollatorForCompletionOnlyLM did; a row whose marker was cut off is masked whole (counted).
- Model: float32 weights; Llama-2 gets a `<pad>` token and its embeddings grow to 32001 rows (new rows
  N(0, 0.02)); 8-bit LoRA loads in float16 and peft casts the rest to float32. LoRA r 16, alpha 8, dropout
  0.05 on `q_proj, k_proj, v_proj, o_proj`: OPT has no `o_proj`, so its LoRA trains q/k/v only.
- Training: `transformers.Trainer` (trl 0.7.11's SFTTrainer only tokenised the text and handed it to the
  Trainer), shuffled by torch's RandomSampler on the global generator that the Trainer seeds at its init,
  reentrant gradient checkpointing, float32 without autocast or TF32, one epoch. Backprop: the Trainer's
  optimizer (decay/no-decay groups, weight decay 0), lr 5e-5, cosine schedule without warmup, gradient
  clipping at 1.0. Fused: one optimizer per parameter with lr 1e-3 (torch's class defaults otherwise, so
  AdamW has weight decay 0.01), `CosineAnnealingLR(T_max=10)`, no clipping. torch's default optimizer
  implementation (foreach on CUDA).
- `--test` (no `time_test` section): batch 1, so 10 steps. The first `profile_steps` steps run under the
  torch profiler (CPU+CUDA, shapes, stacks, memory) and the CUDA allocator history; at its end the run reads
  the process-lifetime `max_memory_allocated` / `max_memory_reserved` (the source's timeline titles) and
  writes the chrome trace, the memory timeline by category and the allocator snapshot.
- `--time_test` (`time_test` section): `trainer.train()` called `trials` (100) times on the same Trainer
  (model, optimizer state and the fused method's scheduler carry over; the Trainer's own scheduler restarts),
  each with its checkpoint save, timed per call; the first trial is dropped and the mean gets a percentile
  bootstrap interval (k = 2000 resamples, indices floor(k a/2) and ceil(k (1 - a/2)) of the sorted means).
  The source's time test reads batch_size (16), not test_batch_size, so each trial is one step on one batch
  of the 10 rows: the experiments say so with `batch_size: 16`.
The measuring runs in a fresh process (clean lifetime peaks, as the source's one run per process), with
CUDA_LAUNCH_BLOCKING=1 on a GPU as every jobscript exported it.

Deliberate differences from the source:
- No W&B logging (the source's `report_to="wandb"` also ran inside each timed trial) and no `ExampleCallback`.
- `seed` is set before the model loads, so LoRA's initial A matrices and Llama's new embedding rows are
  seeded too (the source seeded only at Trainer init, which still orders the rows as it did). Today's
  accelerate would shuffle with its own seedable sampler: it is turned off to keep the source's order.
- The response marker is found by character offsets in the rendered text rather than by searching its token
  ids; the two agree wherever the marker's tokens stand alone, as for the source's tokenizers (tested
  against a re-computation of trl's search), and the offsets also work for tokenizers that merge a marker
  with its neighbours (the tiny models' byte-level BPE).
- In test mode no checkpoint is written at the end (`save_checkpoint`): it came after every measurement.
- Without a GPU the peak is the fresh process's resident set size (glibc's mmap threshold fixed low so it
  tracks live tensors); the allocator history needs CUDA and is skipped. The smoke profiles measure in
  the calling process (`fresh_process: false`) with one thread, to stay quick on shared machines.
- The steps after the profiled window are timed with CUDA synchronisation and get a peak of their own (the
  source's W&B timer logged unsynchronised step times only).
- Options the source did not have: `implementation: fused` (torch's fused kernels), `fused_buckets: layer`
  or `size` (one foreach/fused step per decoder layer, or per `bucket_mb` of gradients, instead of one
  optimizer call per parameter), non-reentrant checkpointing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
                   "fused": {"fused": True}}  # name -> torch optimizer kwargs ("default": torch chooses)


class TrainConfig(Strict):
    method: Literal["backprop", "fused"] = "backprop"
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"  # backprop adamw = transformers' adamw_torch
    implementation: Literal["default", "foreach", "for-loop", "fused"] = "default"
    # fused: one optimizer per parameter (the source's), per decoder layer, or per bucket_mb of gradients
    fused_buckets: Literal["parameter", "layer", "size"] = "parameter"
    bucket_mb: float = Field(25.0, gt=0)  # fused_buckets size: gradient MB per bucket (DDP's default)
    learning_rate: float = Field(5e-5, gt=0)  # transformers' default; the source's fused runs use 1e-3
    weight_decay: float | None = Field(None, ge=0)  # None: Trainer's 0.0 (backprop), the torch class's (fused)
    lr_scheduler: str = "cosine"  # a transformers scheduler, or cosine_annealing (torch's CosineAnnealingLR)
    t_max: int = Field(10, ge=1)  # cosine_annealing: T_max, in optimizer steps
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping (the fused step cannot clip)
    rows: int = Field(10, ge=1)  # the first rows after the multi-turn filter (n_test_batches x test_batch_size)
    batch_size: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: Literal["reentrant", "non-reentrant", "off"] = "reentrant"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # the source: float32, no autocast
    profile_steps: int = Field(6, ge=0)  # the first steps under the profiler (the source's profile_n_steps=5: 6)
    save_checkpoint: bool = False  # test mode: the source saved one at the end, after every measurement

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v != "cosine_annealing" and v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; use cosine_annealing or one of {', '.join(SCHEDULERS)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.method == "fused" and (why := unsupported(
                gradient_accumulation_steps=self.gradient_accumulation_steps, max_grad_norm=self.max_grad_norm,
                grad_scaling=self.mixed_precision == "fp16", distributed=int(os.environ.get("WORLD_SIZE", 1)) > 1)):
            raise ValueError(why)
        if self.method == "backprop" and self.fused_buckets != "parameter":
            raise ValueError("fused_buckets applies to method fused only")
        return self

    @property
    def steps(self) -> int:
        """Optimizer steps of one `trainer.train()`."""
        return math.ceil(self.rows / self.batch_size) // self.gradient_accumulation_steps * self.epochs


class TimeTest(Strict):
    """finetune.py --time_test True and notebooks/timing_experiment_CIs.ipynb."""

    trials: int = Field(100, ge=2)  # trainer.train() calls, each timed
    drop_first: int = Field(1, ge=0)  # the notebook's skiprows=1
    resamples: int = Field(2000, ge=10)  # bootstrap k
    confidence: float = Field(0.95, gt=0, lt=1)
    save_checkpoint: bool = True  # inside every trial, as save_strategy="epoch" did
    keep_checkpoints: bool = False  # delete the checkpoint directory after the run

    @model_validator(mode="after")
    def _enough(self):
        if self.trials - self.drop_first < 2:
            raise ValueError(f"trials ({self.trials}) must leave at least 2 after drop_first ({self.drop_first})")
        return self


class Config(RecipeConfig):
    model: ModelConfig
    data: DataConfig
    template: Literal["llama-2-no-bos", "opt-sep"]  # lm.templates.CHAT_TEMPLATES; its markers mask the prompt
    train: TrainConfig = TrainConfig()
    time_test: TimeTest | None = None  # set: the time test instead of the profiled test run
    export_trace: bool = True  # the profiler's chrome trace (trace.json.gz)
    cuda_launch_blocking: bool = True  # every source jobscript exported CUDA_LAUNCH_BLOCKING=1
    threads: int | None = Field(None, ge=1)  # CPU threads of the measuring process (OMP_NUM_THREADS); None: torch's
    fresh_process: bool = True  # measure in a new process (lifetime peaks of this run only); False: in this one

    @field_validator("data")
    @classmethod
    def _lima_data(cls, v: DataConfig) -> DataConfig:
        if v.format not in ("lima", "chat"):
            raise ValueError("memory-efficiency fine-tunes on LIMA: use format lima (GAIR/lima) or chat (messages)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.model.quantization and self.model.lora is None:
            raise ValueError("a quantized model cannot be fine-tuned in full: add model.lora (as in the source)")
        if self.model.gradient_checkpointing:
            raise ValueError("set train.gradient_checkpointing (reentrant, as the source), not model.gradient_checkpointing")
        if self.time_test is not None and self.train.profile_steps:
            raise ValueError("the time test runs without the profiler, as the source's (callbacks = []): "
                             "set train.profile_steps=0")
        return self


# --- data -------------------------------------------------------------------------------------------------

def select_rows(rows: list[dict], fmt: str, n: int) -> list[list[dict]]:
    """The first `n` single-turn conversations as chat messages (lima_utils.filter_example/process_example)."""
    out = []
    for row in rows:
        if fmt == "lima":
            if row["source"] == "multi_turn":
                continue
            turns = row["conversations"]
            if len(turns) not in (1, 2):
                raise UserError(f"GAIR/lima row with {len(turns)} turns outside multi_turn: the source asserts 1 or 2")
            messages = [{"role": r, "content": c} for r, c in zip(("user", "assistant"), turns, strict=False)]
        else:
            messages = row["messages"]
            if sum(m["role"] == "user" for m in messages) != 1:
                continue
        out.append(messages)
        if len(out) == n:
            return out
    raise UserError(f"the data has {len(out)} single-turn rows; train.rows asks for {n}")


def encode(conversations: list[list[dict]], tokenizer, template: str, max_length: int) -> list[dict]:
    """Per row: input_ids, attention_mask (unpadded, at most max_length) and prompt_tokens, the number of
    leading tokens up to the end of the response marker (all of them when truncation cut the marker off)."""
    instruction, response = templates.COMPLETION_MARKERS[template]
    if not tokenizer.is_fast:
        raise UserError(f"{tokenizer.name_or_path}: the completion mask needs a fast tokenizer (character offsets)")
    if template == "opt-sep" and tokenizer.sep_token is None:
        raise UserError("template opt-sep needs a sep token: add model.special_tokens: {sep_token: <SEP>}")
    out = []
    for i, messages in enumerate(conversations):
        text = tokenizer.apply_chat_template(messages, chat_template=templates.CHAT_TEMPLATES[template],
                                             tokenize=False, add_generation_prompt=True)
        # trl's search: the first response marker when there is an instruction marker, else the last one
        at = text.find(response) if instruction else text.rfind(response)
        if at < 0:
            raise UserError(f"row {i}: the rendered text has no response marker {response!r}")
        end = at + len(response)
        enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        prompt = 0
        while prompt < len(offsets) and (offsets[prompt][0] < end or offsets[prompt] == (0, 0)):
            prompt += 1  # special tokens (offset (0, 0)) before the first trained token are prompt too
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "prompt_tokens": prompt,
                    "row": i})
    return out


class Collator:
    """Pads a batch to its longest row (the tokenizer's padding side) and masks padding and prompt in the
    labels, as trl's DataCollatorForCompletionOnlyLM; records which rows each step saw."""

    def __init__(self, tokenizer):
        self.tokenizer, self.order = tokenizer, []

    def __call__(self, features: list[dict]) -> dict:
        self.order.append([f["row"] for f in features])
        batch = self.tokenizer.pad([{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]}
                                    for f in features], return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
        for i, f in enumerate(features):
            start = labels.shape[1] - len(f["input_ids"]) if self.tokenizer.padding_side == "left" else 0
            labels[i, :start + f["prompt_tokens"]] = -100
        return {**batch, "labels": labels}


# --- optimizer, schedule, callbacks ----------------------------------------------------------------------

def fused_optimizer(model, t: TrainConfig):
    """The source's MotherOptimizer: the torch class per parameter (or per layer), lr only, torch's defaults."""
    from llmrepro.training.fused_optimizer import FusedOptimizer, layer_buckets, size_buckets

    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": t.learning_rate, **IMPLEMENTATIONS[t.implementation]}
    if t.weight_decay is not None:
        kwargs["weight_decay"] = t.weight_decay
    buckets = {"parameter": lambda: None, "layer": lambda: layer_buckets(model, params),
               "size": lambda: size_buckets(params, t.bucket_mb)}[t.fused_buckets]()
    return FusedOptimizer(params, optimizer_class(t.optimizer), buckets=buckets, **kwargs)


def scheduler(optimizer, t: TrainConfig):
    import torch
    from transformers import get_scheduler

    if t.lr_scheduler == "cosine_annealing":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.t_max)
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)


def _callbacks(cfg: Config, out: Path, model, device: str):
    """(profiler window callback, step clock callback): transformers callbacks, built here to keep imports lazy."""
    import torch
    from transformers import TrainerCallback

    from llmrepro.training import memory

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class ProfilerWindow(TrainerCallback):
        """The first `profile_steps` steps under the torch profiler and the CUDA allocator history, started at
        the epoch's beginning (TorchProfilerCallback + MemoryHistoryCallback in the source's order)."""

        def __init__(self):
            self.prof, self.steps, self.metrics, self.done = None, 0, {}, cfg.train.profile_steps == 0

        def on_train_begin(self, args, state, control, **kw):
            if self.done:  # no window: the peak of the timed steps starts here
                self.start_timed_peak()

        def on_epoch_begin(self, args, state, control, **kw):
            if not self.done and self.prof is None:
                self.prof = memory.profiler()
                self.prof.start()
                self.history = memory.start_allocator_history()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None:
                self.prof.step()
                self.steps += 1
                if self.steps >= cfg.train.profile_steps:
                    self.stop()

        def on_train_end(self, args, state, control, **kw):
            if self.prof is not None:
                self.stop()

        def stop(self):
            sync()
            self.prof.stop()
            peaks = memory.lifetime_peaks_gib()  # read when the source read them: the timeline's title
            self.metrics.update(peaks, profile_steps=self.steps, profile_peak_mb=memory.peak_mb())
            times, by_category = memory.timeline(self.prof)
            (out / "memory_timeline.json").write_text(json.dumps({"time_ms": times, "mb": by_category}))
            title = f"{cfg.model.name}: {cfg.train.method} + {cfg.train.optimizer}, first {self.steps} steps"
            if peaks["max_memory_allocated_gib"] is not None:
                title += (f"\nMax memory allocated: {peaks['max_memory_allocated_gib']:.2f} GiB, "
                          f"reserved: {peaks['max_memory_reserved_gib']:.2f} GiB")
            memory.plot_timeline(times, by_category, out / "memory_timeline.png", title)
            self.metrics.update({f"timeline_peak_{k}_mb": v for k, v in memory.peak_breakdown(by_category).items()})
            if cfg.export_trace:
                self.prof.export_chrome_trace(str(out / "trace.json.gz"))
            if self.history:
                memory.dump_allocator_history(out / "memory_snapshot.pickle")
            self.prof, self.done = None, True
            self.start_timed_peak()

        def start_timed_peak(self):
            memory.reset_peak()  # the steps after the window get a peak of their own
            self.metrics["timed_start_mb"] = memory.current_mb()

    class StepClock(TrainerCallback):
        """Wall time of each step (synchronised) and the memory the forward pass adds, after the window."""

        def __init__(self, window: ProfilerWindow):
            self.window, self.times, self.forward_mb, self.counting, self.before = window, [], [], False, 0.0
            model.register_forward_pre_hook(self.before_forward)
            model.register_forward_hook(self.after_forward)

        def before_forward(self, module, args):
            self.before = memory.current_mb()

        def after_forward(self, module, args, output):
            if self.counting:
                self.forward_mb.append(memory.current_mb() - self.before)

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.counting, self.start = self.window.done, time.perf_counter()  # a step after the window

        def on_step_end(self, args, state, control, **kw):
            sync()
            if self.counting:
                self.times.append(time.perf_counter() - self.start)
            self.counting = False

    window = ProfilerWindow()
    return window, StepClock(window)


# --- the measuring process -------------------------------------------------------------------------------

class _Inputs:
    """Collects `record_input` calls in the measuring process, for the run's manifest."""

    def __init__(self):
        self.records = []

    def record_input(self, kind: str, name: str, **details) -> None:
        self.records.append([kind, name, details])


def measure(args: dict) -> dict:
    """Fine-tune as configured and measure (in a fresh process unless fresh_process is off). args: {config, out_dir}."""
    import torch

    cfg = Config.model_validate(args["config"])
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _measure(cfg, Path(args["out_dir"]))
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: Config, out: Path) -> dict:
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from llmrepro.training import memory

    t, tt = cfg.train, cfg.time_test
    inputs, device = _Inputs(), default_device()
    if device == "cuda":  # transformers 4.38 with tf32=False turned TF32 off for matmuls and cuDNN
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tokenizer = load_tokenizer(cfg.model)  # builds a tiny model on first use (which reseeds), so before set_seed
    rows = select_rows(data.load_rows(cfg.data, inputs), cfg.data.format, t.rows)
    dataset = encode(rows, tokenizer, cfg.template, t.max_length)
    set_seed(cfg.seed)
    model = load_model(cfg.model, ctx=inputs, tokenizer=tokenizer)
    if cfg.model.quantization is None and cfg.model.device_map is None:
        model.to(device)
    model_mb = memory.current_mb()
    trainable = [p for p in model.parameters() if p.requires_grad]

    save = tt.save_checkpoint if tt else t.save_checkpoint
    targs = TrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay or 0.0, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="constant" if t.lr_scheduler == "cosine_annealing" else t.lr_scheduler,
        activation_checkpointing=t.gradient_checkpointing != "off",
        activation_checkpointing_kwargs={"use_reentrant": t.gradient_checkpointing == "reentrant"},
        bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16", logging_steps=1,
        save_strategy="epoch" if save else "no", report_to=[], disable_tqdm=True, use_cpu=device == "cpu",
        seed=cfg.seed, remove_unused_columns=False, dataloader_num_workers=0,
        accelerator_config={"use_seedable_sampler": False})
    window, clock = _callbacks(cfg, out, model, device) if tt is None else (None, None)
    collator = Collator(tokenizer)
    common = dict(model=model, args=targs, train_dataset=dataset, data_collator=collator, processing_class=tokenizer,
                  callbacks=[c for c in (window, clock) if c is not None])
    if t.method == "fused":
        optimizer = fused_optimizer(model, t)
        trainer = Trainer(**common, optimizers=(optimizer, scheduler(optimizer, t)))
    else:
        kwargs = {"lr": t.learning_rate, **IMPLEMENTATIONS[t.implementation]}
        trainer = Trainer(**common, optimizer_cls_and_kwargs=(optimizer_class(t.optimizer), kwargs))
        if t.lr_scheduler == "cosine_annealing":  # ours, not the Trainer's: it then carries over between trials
            trainer.create_optimizer()
            trainer.lr_scheduler = scheduler(trainer.optimizer, t)

    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the run logs its metrics
    metrics: dict = {}
    logs = []  # the Trainer's log entry of every step ({loss, learning_rate, ...}), over all trials
    if tt is None:
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
    else:
        trials = []
        for _ in range(tt.trials):
            start = time.perf_counter()
            trainer.train()
            if device == "cuda":
                torch.cuda.synchronize()
            trials.append(time.perf_counter() - start)
            logs += [e for e in trainer.state.log_history if "loss" in e]  # each train() starts a new state
        (out / "time_test.txt").write_text("".join(f"{s}\n" for s in trials))  # the source's file, one per line
        kept = trials[tt.drop_first:]
        from llmrepro.lm import mc  # the thesis' bootstrap_CI (the same function mc-eval's intervals use)

        low, high = mc.bootstrap_ci(kept, alpha=1 - tt.confidence, k=tt.resamples, seed=cfg.seed)
        metrics.update(trial_time_s=sum(kept) / len(kept), trial_time_ci_low=low, trial_time_ci_high=high,
                       trials=tt.trials, trials_kept=len(kept))
        if not tt.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()  # the Trainer makes its output_dir even when it saves nothing

    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    sizes = [p.numel() * p.element_size() / memory.MB for p in trainable]
    steps = {"loss": [e["loss"] for e in logs], "learning_rate": [e["learning_rate"] for e in logs],
             "rows": collator.order, "tokens": [len(f["input_ids"]) for f in dataset],
             "prompt_tokens": [f["prompt_tokens"] for f in dataset]}
    (out / "steps.json").write_text(json.dumps(steps))  # per step (of every trial): loss, lr, which rows
    metrics.update(
        steps=len(logs), rows=len(dataset),
        rows_without_response=sum(f["prompt_tokens"] >= len(f["input_ids"]) for f in dataset),
        loss_first=steps["loss"][0], loss_last=steps["loss"][-1], lr_first=steps["learning_rate"][0],
        lr_last=steps["learning_rate"][-1], trainable_params=sum(p.numel() for p in trainable),
        param_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / memory.MB,
        trainable_param_mb=sum(sizes), largest_grad_mb=max(sizes), optimizer_state_mb=state / memory.MB,
        model_memory_mb=model_mb)
    if t.method == "fused":
        metrics["largest_bucket_mb"] = optimizer.largest_bucket_bytes / memory.MB
    if tt is None:
        metrics.update({"max_memory_allocated_gib": None, "max_memory_reserved_gib": None, **window.metrics})
        metrics.update(step_time_s=sum(clock.times) / len(clock.times) if clock.times else None,
                       timed_peak_mb=memory.peak_mb() if clock.times else None,
                       activation_mb=max(clock.forward_mb) if clock.forward_mb else None)
        metrics["peak_memory_mb"] = max(v for v in (metrics.get("profile_peak_mb"), memory.peak_mb()) if v)
    else:
        metrics["peak_memory_mb"] = memory.peak_mb()  # the process's lifetime peak
    metrics["inputs"] = inputs.records
    return metrics


def run(cfg: Config, ctx) -> dict:
    from llmrepro.training import memory

    quantization_config(cfg.model)  # 8-bit/4-bit without a GPU: the one-line error now, before spawning
    env = {"CUDA_LAUNCH_BLOCKING": "1"} if cfg.cuda_launch_blocking else {}
    if cfg.threads:  # on a shared CPU, more threads than free cores make every small op wait for the others
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    what = "time test" if cfg.time_test else "profiled test run"
    ctx.log.info("%s of %s (%s + %s) in a fresh process on %s", what, cfg.model.name, cfg.train.method,
                 cfg.train.optimizer, default_device())
    args = {"config": cfg.model_dump(mode="json"), "out_dir": str(ctx.dir)}
    result = memory.in_fresh_process(f"{__name__}:measure", args, env=env) if cfg.fresh_process else measure(args)
    for kind, name, details in result.pop("inputs"):
        ctx.record_input(kind, name, **details)
    ctx.log_metrics(result, step=result["steps"])
    return result
