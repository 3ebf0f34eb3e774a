"""instruct-sft: Dolly template, completion-only masking at the token level, and real smoke runs."""

from __future__ import annotations

import json

import pytest
import torch

from llmrepro.lm.models import ModelConfig, load_tokenizer
from llmrepro.lm.templates import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL
from llmrepro.lm.templates import dolly_prompt as format_prompt
from llmrepro.recipes.instruct_sft import CompletionOnlyCollator, find_subsequence

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
