"""The preference trainers: TRL 1.16's `DPOTrainer`, with the source's pair tokenisation, and `ReprPOTrainer`,
a subclass that overrides `compute_loss` only. Also: forward hooks that capture HF `hidden_states[k]`, and
the scoring of preference pairs with the adapter on and off.

    trainer = ReprPOTrainer(model=plain_model, peft_config=lora, args=DPOConfig(...), train_dataset=pairs,
                            processing_class=tok, repr=ReprSettings(loss="mse", layers=(10, 20), alpha=0.05))

One path for the adapter: the trainer always gets the plain (possibly 4-bit) model and a `peft_config`, so TRL
wraps it under the adapter name "default" and the reference is the same model with the adapter disabled (as the
source's `null_ref_context`). A model that is already a PeftModel is refused (`check_plain_model`): TRL 1.16
raises on peft_config + PeftModel, and a PeftModel without peft_config would make TRL copy the adapter into a
"ref" adapter, a different reference (TRL 0.9 instead merged and replaced the adapter, the source's 07-08 bug).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from llmrepro.core.errors import UserError
from llmrepro.lm.layers import decoder_parts, layer_output
from llmrepro.training import preference as P

try:  # TRL 1.16 keeps it in trl.models.utils
    from trl.models.utils import disable_gradient_checkpointing
except ImportError:  # pragma: no cover
    disable_gradient_checkpointing = None


def check_plain_model(model) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise UserError("the preference trainers take the plain model and a LoRA config (model.lora), not a model "
                        "that already has an adapter: load it without model.lora")


# ------------------------------------------------------------------------------------------- hidden states


class HiddenStateCapture:
    """Forward hooks recording HF's `hidden_states[k]` for each index k, in the order the forwards run.

    HF indexing, as the source's `collect_hs(outputs.hidden_states)[:, layers]`: 0 is the input embeddings, k the
    output of decoder layer k-1 (0-based), and the last index (the number of layers) the final-norm output. Hooks
    run once per forward even under gradient checkpointing (transformers 5 checkpoints `forward`, not the module
    call), and the captured policy tensors carry their autograd graph."""

    def __init__(self, model, indices):
        embed, layers, norm = decoder_parts(model)
        n = len(layers)
        if any(not 0 <= k <= n for k in indices):
            raise UserError(f"layers {list(indices)}: hidden-state indices must be in 0..{n} for this model "
                            f"({n} decoder layers; {n} is the final-norm output)")
        self.modules = [embed if k == 0 else norm if k == n else layers[k - 1] for k in indices]
        self.slots: list[list] = [[] for _ in indices]
        self.handles = []

    def _hook(self, slot, module, args, output):
        self.slots[slot].append(layer_output(output))

    def __enter__(self):
        self.handles = [m.register_forward_hook(lambda mod, a, out, s=s: self._hook(s, mod, a, out))
                        for s, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self):
        """The hidden states of the forward that just ran: (N, L, T, H); the record is cleared."""
        if any(len(s) != 1 for s in self.slots):
            raise RuntimeError(f"expected one capture per layer, got {[len(s) for s in self.slots]}")
        out = torch.stack([s[0] for s in self.slots], dim=1)
        self.slots = [[] for _ in self.slots]
        return out


def _no_checkpointing(trainer):
    if disable_gradient_checkpointing is None:
        return contextlib.nullcontext()
    return disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs)


# ------------------------------------------------------------------------------------------------ trainers


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer; with `source_tokenization=(max_length, max_prompt_length)` the pairs are tokenised as
    TRL 0.9.6 did (`preference.tokenize_pair`) instead of by TRL 1.16's `_prepare_dataset` (then give the
    DPOConfig max_length=None, so that its collator does not truncate a second time)."""

    def __init__(self, *args, source_tokenization: tuple[int, int] | None = None, **kwargs):
        self.source_tokenization = source_tokenization
        check_plain_model(kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.source_tokenization is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        tok = getattr(processing_class, "tokenizer", processing_class)
        max_length, max_prompt_length = self.source_tokenization
        return dataset.map(lambda r: P.tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"], max_length,
                                                     max_prompt_length),
                           remove_columns=dataset.column_names, desc=f"Tokenizing {dataset_name} pairs (TRL 0.9)")


@dataclass
class ReprSettings:
    """What ReprPO adds to DPO: the representation loss and its schedule, and the optional DPO-style term."""

    loss: str = "regular-final"  # a key of preference.REPR_LOSSES
    layers: tuple[int, ...] = (10, 20, 26)  # HF hidden_states indices (trainer.py @1a42e87 on; (10, 20) before)
    alpha: float = 1.0  # retain weight
    schedule: str = "rows"  # a key of preference.SCHEDULES
    loss_type: str = "ipo"  # the source's hard-coded self.loss_type: per-token-mean log-probs; the DPO term's loss
    dpo_weight: float = 0.0  # weight of a DPO-style term; the source has none
    repr_weight: float = 1.0  # weight of the representation loss
    beta: float = 0.1
    temperature: float = 30.0  # the batch weight softmax(-T * logits)


class ReprPOTrainer(PreferenceTrainer):
    """DPOTrainer whose `compute_loss` is the representation-preference loss of the source (see preference.py).

    One micro-batch: the policy forward (adapter on) and the reference forward (adapter disabled, under no_grad,
    as TRL does for PEFT) both run TRL's fused LM head, which gives per-token log-probs; forward hooks capture the
    hidden states at `repr.layers`. Then, on the source's per-token-mean log-probs (loss_type 'ipo'),
    logits = (pi_c - pi_r) - (ref_c - ref_r), w = softmax(-30 logits), and
        loss = repr_weight * combine(L_rr, L_retain, c, alpha) + dpo_weight * DPO term (summed log-probs, as TRL).
    """

    def __init__(self, *args, repr: ReprSettings, **kwargs):
        if repr.loss not in P.REPR_LOSSES or repr.schedule not in P.SCHEDULES:
            raise UserError(f"unknown loss {repr.loss!r} or schedule {repr.schedule!r}")
        self.repr = repr
        super().__init__(*args, **kwargs)

    def retain_coefficient(self) -> float:
        return P.SCHEDULES[self.repr.schedule](self.state.global_step, self.state.max_steps, len(self.train_dataset))

    def forward_pair(self, model, inputs):
        """Policy and reference passes of one batch: (policy out, policy hs, reference out, reference hs)."""
        completion_mask = inputs["completion_mask"]
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                      labels=inputs["input_ids"].masked_fill(completion_mask == 0, -100), fused_lm_head=True)
        unwrapped = self.accelerator.unwrap_model(model)
        with HiddenStateCapture(unwrapped, self.repr.layers) as capture:
            out = model(**kwargs)
            policy_hs = capture.take()  # (2B, L, T, H), with grad
            with torch.no_grad(), _no_checkpointing(self), use_adapter(unwrapped, adapter_name=None):
                ref = self.model(**kwargs)
            ref_hs = capture.take().detach()
        return out, policy_hs, ref, ref_hs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        s = self.repr
        completion_mask = inputs["completion_mask"]
        out, policy_hs, ref, ref_hs = self.forward_pair(model, inputs)
        seq_len = completion_mask.size(1) - 1
        pol_tok, ref_tok = out.log_probs[:, -seq_len:], ref.log_probs[:, -seq_len:]

        # the source's log-probs: per-token means with loss_type 'ipo' (its default), sums otherwise
        reduction = "mean" if s.loss_type == "ipo" else "sum"
        pi_c, pi_r = P.sequence_logps(pol_tok, completion_mask, reduction).chunk(2)
        ref_c, ref_r = P.sequence_logps(ref_tok, completion_mask, reduction).detach().chunk(2)
        logits = (pi_c - pi_r) - (ref_c - ref_r)
        weight = P.batch_weight(logits, s.temperature)

        mask_c, mask_r = inputs["attention_mask"].to(policy_hs.dtype).chunk(2)
        pol_c, pol_r = policy_hs.chunk(2)
        ref_cho, _ = ref_hs.chunk(2)  # the source never uses the reference's rejected hidden states
        hs = P.HiddenStates(pol_c, pol_r, ref_cho, mask_c, mask_r, weight)
        rr, retain = P.REPR_LOSSES[s.loss](hs)
        c = self.retain_coefficient()
        repr_loss = P.combine(rr, retain, c, s.alpha)
        loss = s.repr_weight * repr_loss if s.repr_weight else torch.zeros((), device=rr.device)
        if s.dpo_weight:
            sums = P.sequence_logps(pol_tok, completion_mask, "sum").chunk(2)
            ref_sums = P.sequence_logps(ref_tok, completion_mask, "sum").detach().chunk(2)
            dpo = P.dpo_loss(*sums, *ref_sums, completion_mask, s.beta, s.loss_type)
            loss = loss + s.dpo_weight * dpo
            self._metrics[mode]["dpo/loss"].append(dpo.item())

        with torch.no_grad():
            chosen_rewards, rejected_rewards = s.beta * (pi_c - ref_c), s.beta * (pi_r - ref_r)
            m = self._metrics[mode]
            m["rewards/chosen"].append(chosen_rewards.mean().item())
            m["rewards/rejected"].append(rejected_rewards.mean().item())
            m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            m["logps/chosen"].append(pi_c.mean().item())
            m["logps/rejected"].append(pi_r.mean().item())
            m["rr/loss"].append(rr.item())
            m["retain/loss"].append(0.0 if retain is None else retain.item())
            m["repr/loss"].append(repr_loss.item())
            m["c"].append(c)
            m["weighting"].append(weight.mean().item())
            m["retain_cosine"].append(torch.nn.functional.cosine_similarity(pol_c, ref_cho, dim=-1).mean().item())
            m["rr_cosine"].append(torch.nn.functional.cosine_similarity(pol_r, ref_cho, dim=-1).mean().item())
        return (loss, out) if return_outputs else loss


# --------------------------------------------------------------------------------------------- pair scoring


@torch.no_grad()
def score_pairs(trainer, dataset, batch_size: int, progress=None) -> dict:
    """Per-pair completion log-probs of the policy (adapter on) and the base model (adapter disabled) on an
    already tokenised dataset (prompt_ids, chosen_ids, rejected_ids): {policy_chosen, policy_rejected,
    base_chosen, base_rejected}, each a dict of 'sum' and 'mean' (per completion token) float tensors."""
    model = trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    rows = list(dataset)
    parts: dict[str, list] = {k: [] for k in ("policy", "base")}
    batches = range(0, len(rows), batch_size)
    try:
        for start in progress(batches, desc="pairs") if progress else batches:
            batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                           for r in rows[start:start + batch_size]])
            batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
            mask = batch["completion_mask"]
            kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                          labels=batch["input_ids"].masked_fill(mask == 0, -100), fused_lm_head=True)
            for name in ("policy", "base"):
                ctx = use_adapter(unwrapped, adapter_name=None) if name == "base" else contextlib.nullcontext()
                with ctx:
                    tok = model(**kwargs).log_probs[:, -(mask.size(1) - 1):].float()
                parts[name].append((P.sequence_logps(tok, mask, "sum").cpu(),
                                    P.sequence_logps(tok, mask, "mean").cpu()))
    finally:
        model.train(was_training)
    out = {}
    for name, chunks in parts.items():
        for i, reduction in enumerate(("sum", "mean")):
            c, r = zip(*[x[i].chunk(2) for x in chunks], strict=True)
            out.setdefault(f"{name}_chosen", {})[reduction] = torch.cat(c)
            out.setdefault(f"{name}_rejected", {})[reduction] = torch.cat(r)
    return out


def pair_metrics(scores: dict, prefix: str, reduction: str, beta: float, resamples: int = 2000,
                 seed: int = 0) -> dict:
    """From `score_pairs`: the source's eval/dpo.py preference accuracy (per-token-mean log-ratio chosen vs
    rejected > 0) for the adapter and the base model, the probability it puts on chosen (sigmoid of that
    log-ratio), and the DPO reward accuracy beta (pi - ref) chosen > rejected on `reduction` log-probs."""
    pc, pr = scores["policy_chosen"], scores["policy_rejected"]
    bc, br = scores["base_chosen"], scores["base_rejected"]
    out = {}
    for who, (c, r) in (("", (pc, pr)), ("_base", (bc, br))):
        ratio = c["mean"] - r["mean"]
        out.update(P.with_ci(f"{prefix}_accuracy{who}", (ratio > 0).float().tolist(), resamples=resamples, seed=seed))
        out.update(P.with_ci(f"{prefix}_prob{who}", torch.sigmoid(ratio).tolist(), resamples=resamples, seed=seed))
    rewards_c = beta * (pc[reduction] - bc[reduction])
    rewards_r = beta * (pr[reduction] - br[reduction])
    out.update(P.with_ci(f"{prefix}_reward_accuracy", (rewards_c > rewards_r).float().tolist(), resamples=resamples,
                         seed=seed))
    out[f"{prefix}_reward_margin"] = float((rewards_c - rewards_r).mean())
    return out


# --------------------------------------------------------------------------------------------- the run


def _log_callback(log):
    from transformers import TrainerCallback

    class LogToRun(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            log.info("step %d: %s", state.global_step, logs)

    return LogToRun()


def dpo_args(cfg, ctx, loss_type):
    """TRL's DPOConfig for a preference config (`training.preference.PreferenceConfig`)."""
    from trl import DPOConfig

    from llmrepro.core.progress import enabled as progress_enabled

    t, cuda = cfg.train, torch.cuda.is_available()
    if t.tf32 and not cuda:
        ctx.log.info("train.tf32 applies to CUDA only; not set on this machine")
    return DPOConfig(
        output_dir=str(ctx.dir / "checkpoints"), seed=cfg.seed, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, optim=t.optimizer,
        max_grad_norm=t.max_grad_norm, bf16=t.bf16, tf32=(t.tf32 if cuda else None),
        gradient_checkpointing=t.gradient_checkpointing, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=1, report_to=["wandb"] if ctx.tracking else [],
        disable_tqdm=not progress_enabled(), remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=False, beta=cfg.beta, loss_type=loss_type, disable_dropout=t.disable_dropout,
        # with the source's tokenisation the pairs are already cut; TRL must not cut (or drop) them again
        max_length=None if t.tokenization == "trl-0.9" else t.max_length, precompute_ref_log_probs=False,
    )


def load_plain_model(cfg, ctx):
    """The base model without adapter (TRL adds it from the peft config); 4-bit models prepared as the source did
    (`prepare_model_for_kbit_training`: non-quantized weights upcast to float32, input grads for checkpointing)."""
    from llmrepro.lm.models import load_model

    model = load_model(cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False}), ctx=ctx)
    if cfg.model.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    model.config.use_cache = False
    return model


def train_and_evaluate(cfg, ctx, trainer_cls, loss_type, reward_reduction: str = "sum", **trainer_kwargs) -> dict:
    """Train a LoRA adapter with `trainer_cls` (PreferenceTrainer or ReprPOTrainer) on `cfg.data`, save it, and
    measure it against the base model: reward accuracy while training and after, pair accuracies, TruthfulQA.
    `loss_type` goes to TRL's DPOConfig; `reward_reduction` is how the trainer's logged rewards reduce the
    log-probs ("sum" as TRL, "mean" as the source's ReprPO), so that the re-scored reward accuracy matches."""
    import datasets
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from llmrepro.core import io
    from llmrepro.lm.models import load_tokenizer, lora_config
    from llmrepro.training import memory

    tokenizer = load_tokenizer(cfg.model)
    pairs = P.load_pairs(cfg.data, ctx)
    model = load_plain_model(cfg, ctx)
    t = cfg.train
    source_tok = (t.max_length, t.max_prompt_length) if t.tokenization == "trl-0.9" else None
    trainer = trainer_cls(model=model, args=dpo_args(cfg, ctx, loss_type),
                          train_dataset=datasets.Dataset.from_list(pairs), processing_class=tokenizer, peft_config=lora_config(cfg.model.lora),
                          source_tokenization=source_tok, **trainer_kwargs)
    if t.adapter_dtype == "float32":  # undo TRL's bf16 cast of a quantized model's adapter (the source kept fp32)
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_log_callback(ctx.log))
    columns = trainer.train_dataset.column_names
    counts = {f"{k}_pairs": sum(trainer.train_dataset[k]) for k in ("truncated", "merged") if k in columns}
    ctx.log.info("%d training pairs %s; %d trainable parameters", len(trainer.train_dataset), counts,
                 sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))

    checkpoints = ctx.dir / "checkpoints"
    checkpoint = get_last_checkpoint(str(checkpoints)) if ctx.resume and checkpoints.is_dir() else None
    memory.reset_peak()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    peak = memory.peak_mb()
    history = trainer.state.log_history
    io.write_json(ctx.dir / "log_history.json", history)
    plot_history(history, ctx.dir / "training.png")
    if cfg.save_adapter:
        trainer.save_model(str(ctx.dir / "adapter"))
        tokenizer.save_pretrained(str(ctx.dir / "adapter"))

    res = cfg.eval.bootstrap_resamples
    steps = [h for h in history if "rewards/accuracies" in h]
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_pairs": len(trainer.train_dataset), **counts, "train_time_s": result.metrics["train_runtime"],
               "peak_memory_mb": peak, "loss_first": next((h["loss"] for h in history if "loss" in h), None),
               "loss_last": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               # the source's "dpo reward acc train": the mean over logged steps of rewards/accuracies
               **P.with_ci("reward_accuracy_train", [h["rewards/accuracies"] for h in steps], res, cfg.seed)}

    reduction, bs = reward_reduction, cfg.eval.batch_size
    n = min(cfg.eval.train_pairs or len(trainer.train_dataset), len(trainer.train_dataset))
    scores = score_pairs(trainer, trainer.train_dataset.select(range(n)), bs, ctx.progress)
    metrics.update(pair_metrics(scores, "train", reduction, cfg.beta, res, cfg.seed))
    for name, spec in cfg.eval.pairs.items():
        ds = trainer._prepare_dataset(datasets.Dataset.from_list(P.load_pairs(spec, ctx)), tokenizer, trainer.args,
                                      name)
        scores = score_pairs(trainer, ds, bs, ctx.progress)
        metrics.update(pair_metrics(scores, name, reduction, cfg.beta, res, cfg.seed))

    if cfg.eval.tqa is not None:
        metrics.update(evaluate_tqa(trainer, tokenizer, cfg.eval.tqa, bs, res, cfg.seed, ctx))
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.state.global_step)
    return metrics


def evaluate_tqa(trainer, tokenizer, spec, batch_size: int, resamples: int, seed: int, ctx) -> dict:
    """TruthfulQA MC1 by mc-eval's `numbered` scorer (lm.mc, the source's protocol), adapter on and off, summarised
    by lm.mc as the mc-eval recipe does: `tqa_score` / `tqa_score_base` (x `spec.scale`) with their bootstrap CIs,
    argmax `tqa_accuracy`, `tqa_coverage` (mass on the choice numbers); per-question figures in tqa.json."""
    from llmrepro.core import io
    from llmrepro.lm import mc

    items = mc.load_items(spec.data, ctx)
    opts = mc.ScoringOptions(numbered=spec.options, batch_size=batch_size)
    model = trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    out, per_item = {"tqa_questions": len(items)}, {}
    try:
        for who, switch in (("", contextlib.nullcontext()), ("_base", use_adapter(unwrapped, adapter_name=None))):
            with switch:
                rows = mc.SCORERS["numbered"](model, tokenizer, items, opts)
            per_item["adapter" if not who else "base"] = rows
            summary = mc.summarize("numbered", rows, resamples, seed)
            for fig in ("score", "accuracy"):  # means with their bootstrap CIs
                for tail in ("", "_ci_low", "_ci_high"):
                    if f"numbered_{fig}{tail}" in summary:
                        scale = spec.scale if fig == "score" else 1
                        out[f"tqa_{fig}{who}{tail}"] = summary[f"numbered_{fig}{tail}"] * scale
            out[f"tqa_coverage{who}"] = summary["numbered_coverage"]
            out[f"tqa_collisions{who}"] = summary["numbered_collisions"]
    finally:
        model.train(was_training)
    io.write_json(ctx.dir / "tqa.json", [{"question": it.question, **{k: v[i] for k, v in per_item.items()}}
                                         for i, it in enumerate(items)])
    return out


def plot_history(history: list[dict], path) -> None:
    """Loss, reward accuracy and (ReprPO) the rr / retain terms over the optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "rr/loss", "retain/loss", "c")
            if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
