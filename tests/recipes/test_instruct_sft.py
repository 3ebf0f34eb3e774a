"""instruct-sft: Dolly's template, length filter, shuffle-then-split, collator, WarmupLR schedule and DeepSpeed config
checked against what databrickslabs/dolly @ e2d664d does (hand computations and independent re-computations of its
code paths), completion-only masking at the token level, and real smoke runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmrepro.lm.models import ModelConfig, load_tokenizer
from llmrepro.lm.templates import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL
from llmrepro.lm.templates import dolly_prompt as format_prompt
from llmrepro.recipes.instruct_sft import (
    DEEPSPEED_CONFIGS,
    CompletionOnlyCollator,
    Config,
    build_examples,
    find_subsequence,
    model_max_length,
    split_examples,
    warmup_log_factor,
)

EXP = "instruct/dolly-pythia-2.8b"


@pytest.fixture
def tokenizer():
    tok = load_tokenizer(ModelConfig(name="tiny-pythia"))
    tok.add_special_tokens({"additional_special_tokens": [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]})
    return tok


def _collate(tok, texts, eos=False):
    key = tok.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    examples = [{"input_ids": tok.encode(t, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])}
                for t in texts]
    return examples, key, CompletionOnlyCollator(tok, key)(examples)


def _assert_masked(examples, key, batch):
    for i, e in enumerate(examples):
        ids, labels, n = e["input_ids"], batch["labels"][i].tolist(), len(e["input_ids"])
        end = find_subsequence(ids, key) + len(key)  # everything up to and including the response key
        assert labels[:end] == [-100] * end
        assert labels[end:n] == ids[end:]  # the response and end key are learnt
        assert labels[n:] == [-100] * (len(labels) - n)  # padding never is
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(labels) - n)


def test_completion_only_masking_single_token_key(tokenizer):
    examples, key, batch = _collate(tokenizer, [format_prompt("Where is Oslo?", "In Norway."),
                                                format_prompt("Summarize.", "A short answer here, longer.", "ctx")])
    assert len(key) == 1  # the key is an added special token, as in the source
    _assert_masked(examples, key, batch)
    assert (batch["labels"] != -100).sum() > 0


def test_completion_only_masking_multi_token_key():
    """Without the added special tokens the key spans several ids; the source matched only the first."""
    tok = load_tokenizer(ModelConfig(name="tiny-pythia"))
    examples, key, batch = _collate(tok, [format_prompt("### Where is Oslo?", "In Norway.")])
    assert len(key) > 1
    _assert_masked(examples, key, batch)
    first = examples[0]["input_ids"].index(key[0])  # "###" of the instruction key comes first
    assert first < find_subsequence(examples[0]["input_ids"], key)


def test_eos_is_learnt_even_when_pad_equals_eos(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token  # the source's setting, which masked every eos
    examples, key, batch = _collate(tokenizer, [format_prompt("Q?", "A."), format_prompt("Longer Q?", "Longer A.")],
                                    eos=True)
    _assert_masked(examples, key, batch)
    short = len(examples[0]["input_ids"])
    assert batch["labels"][0, short - 1].item() == tokenizer.eos_token_id


def test_missing_response_key_is_an_error(tokenizer):
    collator = CompletionOnlyCollator(tokenizer, tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False))
    with pytest.raises(ValueError, match="response key .* not found in example 0"):
        collator([{"input_ids": tokenizer.encode("no key here")}])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from llmrepro.cli import main

    out = tmp_path_factory.mktemp("sft")
    assert main(["run", EXP, "--profile", "smoke", "--output-dir", str(out)]) == 0
    (run_dir,) = (out / EXP).iterdir()
    return run_dir


def test_smoke_run_loss_falls(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["train_samples"] == 40 and metrics["eval_samples"] == 8
    assert metrics["loss_last"] < 0.7 * metrics["loss_first"]
    assert metrics["eval_loss"] < metrics["loss_first"]
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert (smoke_run / "model" / "model.safetensors").is_file()
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["inputs"]["models"][0]["name"] == "tiny-pythia"
    assert manifest["inputs"]["datasets"][0]["name"] == "fixture:dolly"


def test_interrupted_run_resumes_to_the_same_result(smoke_run, tmp_path, monkeypatch, cli):
    """Stop right after the step-15 checkpoint, resume, and land on the uninterrupted run's numbers."""
    import transformers

    original = transformers.Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_stop)
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 130 and "interrupted" in err
    (partial,) = (tmp_path / EXP).iterdir()
    assert partial.name.endswith(".partial") and (partial / "checkpoints" / "checkpoint-15").is_dir()
    assert json.loads((partial / "manifest.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", original)
    code, out, _ = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), "--resume")
    assert code == 0
    resumed = json.loads((tmp_path / EXP / partial.name.removesuffix(".partial") / "metrics.json").read_text())
    reference = json.loads((smoke_run / "metrics.json").read_text())
    assert resumed["steps"] == 30
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert resumed["loss_last"] == pytest.approx(reference["loss_last"], rel=1e-5)


def test_reproduce_matches(smoke_run, tmp_path, cli):
    code, out, _ = cli("reproduce", str(smoke_run / "manifest.json"), "--output-dir", str(tmp_path))
    assert code == 0, out
    assert "reproduce: " in out and " 0 failed" in out
    assert (tmp_path / EXP / f"{smoke_run.name}-repro" / "metrics.json").is_file()


def test_category_filter_keeps_only_summaries(tmp_path, cli):
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), "category_filter=summarization",
                       "test_size=4", "train.max_steps=2", "save_model=false")
    assert code == 0, err
    (run_dir,) = (tmp_path / EXP).iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_samples"] + metrics["eval_samples"] == 16 and metrics["dropped_samples"] == 32
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


# ------------------------------------------------------------------------------------ fidelity to the source

def _config(**train) -> Config:
    return Config(model={"name": "tiny-pythia"}, data={"name": "fixture:dolly", "format": "dolly"},
                  train={"deepspeed": None, **train})


def test_defaults_are_train_dolly_settings():
    """train_dolly.py:155-171 (a100) and trainer.py's Trainer defaults, value by value."""
    t = _config().train
    assert (t.epochs, t.batch_size, t.learning_rate, t.warmup_steps, t.logging_steps, t.eval_steps, t.save_steps,
            t.save_total_limit) == (2, 6, 5e-6, 50, 10, 50, 200, 20)
    assert (t.weight_decay, t.max_grad_norm, t.gradient_accumulation_steps, t.pad_to_multiple_of) == (0.0, 1.0, 1, 8)
    assert t.max_length is None and t.lr_scheduler == "warmup_log" and t.bf16 and not t.fp16
    assert not t.average_tokens_across_devices and Config.model_fields["test_size"].default == 200
    assert Config.model_fields["train"].default.deepspeed == "zero3"


def test_max_length_is_the_models_as_the_source():
    """trainer.py:213-222: the first truthy of n_positions, max_position_embeddings, seq_length; else 1024."""
    from types import SimpleNamespace as NS

    assert model_max_length(NS(max_position_embeddings=2048)) == 2048  # GPT-NeoX (Pythia): no n_positions
    assert model_max_length(NS(n_positions=1024, max_position_embeddings=4096)) == 1024
    assert model_max_length(NS(n_positions=None, max_position_embeddings=0, seq_length=2048)) == 2048
    assert model_max_length(NS()) == 1024


def test_samples_must_be_strictly_shorter_than_max_length(tokenizer):
    """The source truncates at max_length and keeps len(ids) < max_length: a sample of exactly max_length tokens
    goes, one of max_length - 1 stays; an empty response is dropped (the source raises)."""
    rows = [{"instruction": "Say something long.", "context": "", "response": "word " * n, "category": "open_qa"}
            for n in (5, 30)] + [{"instruction": "Q?", "context": "", "response": "", "category": "open_qa"}]
    lengths = [len(tokenizer.encode(format_prompt(r["instruction"], r["response"]), add_special_tokens=False))
               for r in rows[:2]]
    cfg = _config()
    kept, dropped = build_examples(rows, cfg, tokenizer, max_length=lengths[1])
    assert [len(e["input_ids"]) for e in kept] == [lengths[0]] and dropped["too_long"] == 1 and dropped["empty"] == 1
    kept, _ = build_examples(rows, cfg, tokenizer, max_length=lengths[1] + 1)
    assert [len(e["input_ids"]) for e in kept] == lengths


def test_shuffle_then_split_as_the_source():
    """trainer.py:175 then 226: dataset.shuffle(seed) and train_test_split(test_size, seed), recomputed with
    numpy's PCG64 the way datasets draws both permutations."""
    import numpy as np

    examples = [{"input_ids": [i]} for i in range(50)]
    split = split_examples(examples, test_size=7, seed=42)
    shuffled = np.random.default_rng(42).permutation(50)  # Dataset.shuffle
    order = np.random.default_rng(42).permutation(50)  # train_test_split on the shuffled rows
    assert [e["input_ids"][0] for e in split["test"]] == [int(shuffled[i]) for i in order[:7]]
    assert [e["input_ids"][0] for e in split["train"]] == [int(shuffled[i]) for i in order[7:]]


def test_batches_are_padded_to_a_multiple_of_8(tokenizer):
    key = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    examples = [{"input_ids": tokenizer.encode(format_prompt("Q?", "A" * n), add_special_tokens=False)} for n in (1, 9)]
    batch = CompletionOnlyCollator(tokenizer, key, pad_to_multiple_of=8)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (2, -(-longest // 8) * 8)
    _assert_masked(examples, key, batch)


def test_warmup_log_is_deepspeeds_warmuplr():
    """Our LambdaLR against DeepSpeed's own WarmupLR (warmup_type log, min 0, max 5e-6, 50 steps) and a hand
    computation: lr 0 for the first step, then 5e-6 * ln(s) / ln(50), the full 5e-6 from step 51."""
    factor = warmup_log_factor(50)
    hand = [0.0] + [5e-6 * min(1.0, math.log(s) / math.log(50)) for s in range(1, 80)]
    assert [5e-6 * factor(s) for s in range(80)] == pytest.approx(hand, abs=1e-18)
    assert factor(50) == 1.0 and factor(49) < 1.0 and warmup_log_factor(0)(1) == 0.0  # W = max(2, warmup)
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    ds = lr_schedules.WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=5e-6, warmup_num_steps=50)
    ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6), factor)
    for _ in range(80):  # the lr each optimizer step runs at, then one scheduler step, as the engine does
        assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], abs=1e-18)
        opt.step()
        ours.optimizer.step()
        ds.step()
        ours.step()


DOLLY_A100 = {  # config/a100_config.json @ e2d664d
    "fp16": {"enabled": False}, "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_shipped_zero3_configs_are_dollys_but_for_the_documented_changes():
    zero3 = json.loads((DEEPSPEED_CONFIGS / "zero3.json").read_text())
    offload = json.loads((DEEPSPEED_CONFIGS / "zero3_offload.json").read_text())
    assert zero3["optimizer"]["params"].pop("torch_adam") is True  # torch's AdamW instead of FusedAdam
    assert zero3["fp16"] == zero3["bf16"] == {"enabled": "auto"}  # filled from train.bf16 / train.fp16
    assert {**zero3, "fp16": DOLLY_A100["fp16"], "bf16": DOLLY_A100["bf16"]} == DOLLY_A100
    # a10_config.json / v100_config.json: the same plus CPU optimizer offload with pinned memory
    assert offload["zero_optimization"].pop("offload_optimizer") == {"device": "cpu", "pin_memory": True}
    offload["optimizer"]["params"].pop("torch_adam")
    assert {**offload, "fp16": DOLLY_A100["fp16"], "bf16": DOLLY_A100["bf16"]} == DOLLY_A100


def test_dolly_experiments_train_as_the_source():
    from llmrepro.core import catalog

    for size in ("1.4b", "2.8b", "6.9b", "12b"):
        exp = catalog.load(f"instruct/dolly-pythia-{size}")
        cfg = exp.resolve(None)
        assert cfg.model.name == f"EleutherAI/pythia-{size}" and cfg.model.dtype == "float32"  # DeepSpeed casts
        assert cfg.model.gradient_checkpointing and cfg.train.deepspeed == "zero3" and cfg.train.bf16
        assert cfg.train.batch_size * exp.spec.resources.gpus_per_node == 48  # train_dolly.py: 6 x 8 A100s
        assert "e2d664d" in exp.path.read_text().split("recipe:")[0]
        smoke = exp.resolve("smoke")
        assert smoke.train.deepspeed is None and smoke.model.name == "tiny-pythia"


def test_bad_combinations_are_one_clear_error():
    with pytest.raises(ValueError, match="bf16 and train.fp16 are exclusive"):
        _config(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="carries DeepSpeed's WarmupLR"):
        _config(deepspeed="zero3", lr_scheduler="linear")


@pytest.mark.parametrize("name", [n for n in __import__("llmrepro.core.catalog", fromlist=["names"]).names()
                                  if n.startswith("instruct/")])
def test_yaml_header_names_the_command_the_source_files_and_commit(name):
    import re

    from llmrepro.core import catalog

    exp = catalog.load(name)
    lines = exp.path.read_text().splitlines()
    assert lines[0] == f"# llmrepro run {name}"
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "databrickslabs/dolly @ e2d664d" in header and "what the source did" in header.lower()
    assert re.search(r"training/(trainer|consts)\.py", header) and "train_dolly.py" in header
    assert "Deliberate differences" in header
    assert "Deliberate differences from the source" in catalog.registry.get(exp.spec.recipe).load().__doc__
