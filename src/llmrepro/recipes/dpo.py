"""dpo: the DPO baseline of the ReprPO source, TRL's DPOTrainer (sigmoid loss, beta 0.1) on a LoRA adapter.

    llmrepro run reprpo/dpo-llama3-8b-helpsteer --profile smoke

The source (wassname/repr-preference-optimization, notebooks of 2024-07-14/15) trained its DPO baseline with TRL
0.9's DPOTrainer on the same model, adapter and data as the ReprPO runs: lr 2e-6 (the ReprPO runs used 1e-4),
constant schedule, adamw_8bit, bf16, gradient checkpointing, max length 512 / prompt 256, the reference being the
model with the adapter disabled. The trained adapter is scored like the ReprPO ones (TruthfulQA MC1, reward
accuracy on the training pairs, pair accuracy on held-out sets), for the adapter and for the base model.

Deliberate differences from the source (TRL 1.16 instead of 0.9.6):
- The pairs are tokenised as TRL 0.9.6 did (`train.tokenization: trl-0.9`, our reimplementation); TRL 1.16's own
  tokenisation truncates differently and drops long-prompt rows (`trl-1.16` selects it).
- The adapter is created by the trainer from a peft config on the plain model (named "default"); the source
  wrapped it first and named it (ReprPO / DPO). The reference (adapter disabled) is the same.
- TRL 1.16's fused LM head computes the log-probs without materialising logits (same values).
- TRL 1.16 casts a 4-bit model's adapter to bf16; it is cast back to float32 as the source had it
  (`train.adapter_dtype`).
- The 07-14 notebooks trained the DPO adapter in the same PeftModel as the ReprPO one, after it; with every
  adapter disabled for the reference, a fresh model gives the same reference (07_hf_dpo also trained alone).
- Added measurements: the base model next to the adapter, held-out/OOD pair sets, bootstrap 95% CIs.
"""

from __future__ import annotations

from pydantic import field_validator

from llmrepro.training.preference import PreferenceConfig

# TRL 1.16 DPOConfig.loss_type values (checked here so that a typo fails when the config loads)
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class Config(PreferenceConfig):
    loss_type: list[str] = ["sigmoid"]  # TRL's names; several are summed (with their loss_weights)

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in TRL_LOSS_TYPES]
        if unknown or not v:
            raise ValueError(f"unknown DPO loss type(s) {unknown or v}; TRL 1.16 knows {', '.join(TRL_LOSS_TYPES)}")
        return v


def run(cfg: Config, ctx) -> dict:
    from llmrepro.training.preference_trainer import PreferenceTrainer, train_and_evaluate

    return train_and_evaluate(cfg, ctx, PreferenceTrainer, cfg.loss_type, reward_reduction="sum")
