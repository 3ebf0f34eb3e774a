"""training/preference_trainer.py on a tiny Llama with TRL 1.16: hidden-state hooks match HF's hidden_states, the
reference pass has no gradient and runs with the adapter really disabled, ReprPO with representation weight 0
is TRL's own DPO loss, and the single peft path (plain model + peft_config)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.lm.models import LoraSpec, ModelConfig, load_model, load_tokenizer, lora_config
from llmrepro.training import preference as P
from llmrepro.training.preference_trainer import (
    HiddenStateCapture,
    PreferenceTrainer,
    ReprPOTrainer,
    ReprSettings,
    pair_metrics,
    score_pairs,
)

MODEL = ModelConfig(name="tiny-llama", tiny_config={"initializer_range": 0.2},
                    lora=LoraSpec(r=8, alpha=16, rslora=True,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]))


def _pairs(samples=8):
    spec = P.PairData(data={"name": "fixture:helpsteer2-dpo-pairs", "format": "helpsteer2-dpo"}, samples=samples)
    return datasets.Dataset.from_list(P.load_pairs(spec))


def _args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
                logging_steps=1, report_to=[], bf16=False, max_length=None, save_strategy="no", disable_tqdm=True,
                gradient_checkpointing=True, seed=42)
    return DPOConfig(**{**base, **kw})


def _trainer(tmp_path, cls=ReprPOTrainer, samples=8, **kw):
    tok = load_tokenizer(MODEL)
    model = load_model(MODEL.model_copy(update={"lora": None}))
    extra = {"repr": kw.pop("repr")} if cls is ReprPOTrainer else {}
    return cls(model=model, args=_args(tmp_path, **kw), train_dataset=_pairs(samples), processing_class=tok,
               peft_config=lora_config(MODEL.lora), source_tokenization=(48, 24), **extra)


def _perturb_adapter(model, seed=1):
    """LoRA B starts at zero (adapter = identity); give it values so that adapter on and off differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_capture_matches_hf_hidden_states():
    model = load_model(MODEL.model_copy(update={"lora": None})).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    n = model.config.num_hidden_layers
    with torch.no_grad(), HiddenStateCapture(model, list(range(n + 1))) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
        captured = cap.take()  # (1, n + 1, T, H)
    for k in range(n + 1):  # 0 = embeddings, k = output of layers[k-1], n = after the final norm
        torch.testing.assert_close(captured[:, k], out.hidden_states[k])
    with pytest.raises(UserError, match="hidden-state indices must be in 0..2"):
        HiddenStateCapture(model, [3])


def test_reference_pass_has_no_gradient_and_adapter_disabled(tmp_path):
    trainer = _trainer(tmp_path, repr=ReprSettings(loss="mse", layers=(1, 2), alpha=0.5))
    model = trainer.model
    _perturb_adapter(model)
    model.train()
    inputs = _batch(trainer)
    out, policy_hs, ref, ref_hs = trainer.forward_pair(model, inputs)
    assert policy_hs.requires_grad and policy_hs.grad_fn is not None
    assert not ref_hs.requires_grad and ref_hs.grad_fn is None and not ref.log_probs.requires_grad

    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**kw)
        adapted = model(**kw)
    base_hs = torch.stack([base.hidden_states[k] for k in (1, 2)], 1)
    adapted_hs = torch.stack([adapted.hidden_states[k] for k in (1, 2)], 1)
    torch.testing.assert_close(ref_hs, base_hs)  # the reference is the model with the adapter off
    torch.testing.assert_close(policy_hs.detach(), adapted_hs)
    assert (ref_hs - adapted_hs).abs().max() > 1e-3  # and the adapter really changes them
    # the reference log-probs are the base model's
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logp = torch.log_softmax(base.logits[:, :-1].float(), -1)
    logp = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    logp = logp * (labels[:, 1:] != -100)
    torch.testing.assert_close(ref.log_probs[:, -logp.shape[1]:], logp, atol=1e-5, rtol=1e-5)

    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_zero_repr_weight_is_trls_dpo_loss(tmp_path, loss_type):
    """repr_weight 0, dpo_weight 1: ReprPO's loss is DPOTrainer._compute_loss on the same batch (TRL's own code)."""
    trainer = _trainer(tmp_path, repr=ReprSettings(loss="mse", layers=(1, 2), repr_weight=0.0, dpo_weight=1.0,
                                                  loss_type=loss_type), loss_type=loss_type)
    _perturb_adapter(trainer.model)
    inputs = _batch(trainer)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, inputs)
        trl = PreferenceTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    assert abs(float(ours) - float(trl)) < 1e-6
    at_init = {"sigmoid": math.log(2), "ipo": 1 / (2 * 0.1) ** 2}[loss_type]  # policy == reference
    assert abs(float(trl) - at_init) > 1e-4  # the adapter made the batch non-trivial


def test_one_peft_path(tmp_path):
    from peft import PeftModel, get_peft_model

    trainer = _trainer(tmp_path, cls=PreferenceTrainer)
    assert isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" copy: the reference is the adapter disabled
    assert all(m.p == 0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))  # LoRA dropout too
    wrapped = get_peft_model(load_model(MODEL.model_copy(update={"lora": None})), lora_config(MODEL.lora))
    with pytest.raises(UserError, match="not a model that already has an adapter"):
        PreferenceTrainer(model=wrapped, args=_args(tmp_path), train_dataset=_pairs(),
                          processing_class=load_tokenizer(MODEL), peft_config=lora_config(MODEL.lora))


def test_source_tokenization_keeps_every_row(tmp_path):
    trainer = _trainer(tmp_path, cls=PreferenceTrainer, samples=None)
    assert len(trainer.train_dataset) == 17
    tok = load_tokenizer(MODEL)
    first = _pairs(None)[0]
    want = P.tokenize_pair(tok, first["prompt"], first["chosen"], first["rejected"], 48, 24)
    assert {k: trainer.train_dataset[0][k] for k in want} == want
    assert sum(trainer.train_dataset["truncated"]) >= 1  # the fixture's long prompt is cut, not dropped


def test_score_pairs_and_metrics(tmp_path):
    trainer = _trainer(tmp_path, cls=PreferenceTrainer)
    _perturb_adapter(trainer.model)
    scores = score_pairs(trainer, trainer.train_dataset, batch_size=3)
    assert scores["policy_chosen"]["sum"].shape == (8,)
    # by hand for pair 0: summed completion log-prob of the chosen sequence under the adapter
    row = trainer.train_dataset[0]
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits[0, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0][len(row["prompt_ids"]) - 1:]
    assert float(scores["policy_chosen"]["sum"][0]) == pytest.approx(float(lp.sum()), abs=1e-4)
    assert float(scores["policy_chosen"]["mean"][0]) == pytest.approx(float(lp.mean()), abs=1e-4)
    m = pair_metrics(scores, "train", "sum", 0.1, resamples=0)
    ratio = scores["policy_chosen"]["mean"] - scores["policy_rejected"]["mean"]
    assert m["train_accuracy"] == pytest.approx(float((ratio > 0).float().mean()))
    reward = (scores["policy_chosen"]["sum"] - scores["base_chosen"]["sum"]) - \
        (scores["policy_rejected"]["sum"] - scores["base_rejected"]["sum"])
    assert m["train_reward_accuracy"] == pytest.approx(float((reward > 0).float().mean()))
