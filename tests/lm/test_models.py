"""Tiny models: built offline and deterministically, loaded through from_pretrained, identical after a round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmrepro.core.errors import UserError
from llmrepro.lm import tiny
from llmrepro.lm.models import LoraSpec, ModelConfig, load_model, load_tokenizer

TEXT = "The city of Paris is in France."


@pytest.mark.parametrize("name", sorted(tiny.ARCHITECTURES))
def test_tiny_model_save_reload_identical_logits(name, tmp_path):
    cfg = ModelConfig(name=name)
    task = tiny.ARCHITECTURES[name][1]
    tok, model = load_tokenizer(cfg), load_model(cfg, task).eval()
    ids = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again = load_model(ModelConfig(name=str(tmp_path / "m")), task).eval()
    with torch.no_grad():
        after = again(**load_tokenizer(ModelConfig(name=str(tmp_path / "m")))(TEXT, return_tensors="pt")).logits
    assert before.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.equal(before, after)


def test_tiny_build_is_deterministic(tmp_path):
    tiny.build("tiny-llama", tmp_path / "a")
    tiny.build("tiny-llama", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_tiny_config_overrides_scale_the_model():
    small = load_model(ModelConfig(name="tiny-llama"))
    big = load_model(ModelConfig(name="tiny-llama", tiny_config={"hidden_size": 128, "num_hidden_layers": 3}))
    assert big.config.hidden_size == 128 and big.config.num_hidden_layers == 3
    assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    assert tiny.ensure("tiny-llama") != tiny.ensure("tiny-llama", {"hidden_size": 128, "num_hidden_layers": 3})


def test_chat_template_is_tulu_format():
    tok = load_tokenizer(ModelConfig(name="tiny-olmo2"))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert text == "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi\n<|assistant|>\n"


def test_lora_wraps_only_adapters_trainable():
    model = load_model(ModelConfig(name="tiny-llama", lora=LoraSpec(r=4, alpha=8)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("q_proj.lora_A" in n for n in trainable) == 2  # one per layer


def test_model_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"model 'nobody/no-such-model' not found: not a tiny model or local checkpoint"):
        load_model(ModelConfig(name="nobody/no-such-model"))
    with pytest.raises(UserError, match="is not a checkpoint directory"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(UserError, match="tiny_config only applies to tiny models"):
        load_model(ModelConfig(name="nobody/x", tiny_config={"hidden_size": 8}))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="quantization=8bit needs a CUDA GPU"):
            load_model(ModelConfig(name="tiny-llama", quantization="8bit"))
    with pytest.raises(UserError, match="model.lora: "):
        load_model(ModelConfig(name="tiny-llama", lora=LoraSpec(target_modules=["nonexistent_proj"])))
