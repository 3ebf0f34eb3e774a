"""Tiny models built offline, deterministically, so every recipe can run end to end without the hub.

Each tiny model is a real architecture (Llama, GPT-2, OPT, GPT-NeoX/Pythia, OLMo-2, BERT) with a few
thousand to a few hundred thousand parameters, random weights from a fixed seed, and a byte-level BPE
tokenizer trained on bundled text with a Tulu-style chat template. It is built once into the cache and
then loaded like any local checkpoint, through `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmrepro.core import io
from llmrepro.lm import fixtures, templates

SPECIAL = {"eos": "<|endoftext|>", "pad": "<|padding|>", "unk": "<|unk|>", "mask": "<|mask|>"}
VOCAB_SIZE = 1024
TOKENIZER_VERSION = 1  # bump when the trainer settings change (the corpus is hashed)

_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    # name: (config class, task, config kwargs)
    "tiny-llama": ("LlamaConfig", "causal-lm", dict(_DECODER, intermediate_size=176, num_key_value_heads=2)),
    "tiny-olmo2": ("Olmo2Config", "causal-lm", dict(_DECODER, intermediate_size=176, num_key_value_heads=4)),
    "tiny-pythia": ("GPTNeoXConfig", "causal-lm", dict(_DECODER, intermediate_size=256, rotary_pct=0.25)),
    "tiny-opt": ("OPTConfig", "causal-lm", dict(_DECODER, ffn_dim=128, word_embed_proj_dim=64)),
    "tiny-gpt2": ("GPT2Config", "causal-lm", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "tiny-bert": ("BertConfig", "masked-lm", dict(_DECODER, intermediate_size=128)),
}


def is_tiny(name: str) -> bool:
    return name in ARCHITECTURES


# The fixtures whose rows train the tokenizer: a fixed list, so that adding a fixture changes no tiny model.
TOKENIZER_FIXTURES = ("dolly", "alpaca", "alpaca-cleaned", "hc3", "evol-instruct", "lima", "helpsteer2-dpo",
                      "truthfulqa-mc", "cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans",
                      "neg_sp_en_trans", "companies_true_false", "common_claim_true_false")


def corpus() -> list[str]:
    """Bundled training text for the tokenizer: the prompt templates' markup and those fixtures' rows as JSON."""
    return templates.MARKUP + [json.dumps(row) for name in TOKENIZER_FIXTURES for row in fixtures.rows(name)]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL["eos"], bos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], mask_token=SPECIAL["mask"],
                                   model_max_length=512)
    fast.chat_template = templates.TULU_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _fingerprint(name: str, overrides: dict) -> str:
    """Changes whenever the architecture, its overrides, the tokenizer settings or its training text do."""
    blob = json.dumps({"arch": ARCHITECTURES[name], "overrides": overrides, "tok": TOKENIZER_VERSION,
                       "vocab": VOCAB_SIZE, "corpus": io.sha256_text("\n".join(corpus()))}, sort_keys=True)
    return io.sha256_text(blob)[:12]


def build(name: str, path: Path, overrides: dict | None = None) -> None:
    """Write tokenizer and randomly initialised weights (seed 0) of tiny model `name` to `path`."""
    import torch
    import transformers

    cls_name, task, kwargs = ARCHITECTURES[name]
    tok = build_tokenizer(path)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if task == "masked-lm":
        ids = dict(pad_token_id=tok.pad_token_id)
    cfg = getattr(transformers, cls_name)(vocab_size=len(tok), **{**kwargs, **(overrides or {})}, **ids)
    auto = transformers.AutoModelForMaskedLM if task == "masked-lm" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)


def ensure(name: str, overrides: dict | None = None) -> Path:
    """Path of tiny model `name` (with config overrides), building it into the cache the first time."""
    overrides = overrides or {}
    path = io.cache_dir() / "tiny" / f"{name}-{_fingerprint(name, overrides)}"
    return io.build_once(path, lambda tmp: build(name, tmp, overrides))
