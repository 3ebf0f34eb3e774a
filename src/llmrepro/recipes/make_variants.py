"""make-variants: paraphrased and model-generated versions of single-turn chat samples (LIMA in the source).

Reproduces the gradient-similarity project's datasets:
- `paraphrased`: the question and the answer of every single-turn sample paraphrased separately by an LLM
  with the source's system prompt (gpt-4o-mini-2024-07-18, temperature 1, seed 42 in the source);
- `model-generated`: the paraphrased question, answered by the model under study with greedy decoding
  (max 512 new tokens in the source). It needs a `paraphrased` run's output: checked before any work.

Generators are pluggable: `openai` (any OpenAI-compatible chat endpoint, called with httpx; the key is read
from the environment variable `api_key_env`), `local` (a local or hub model through transformers, greedy),
and `rules` (a fixed word-substitution rewording, no model: for tests and for self-contained smoke runs of
the recipes downstream; it is not a paraphraser worth studying).

Output: `variants.jsonl` in the run directory, one row per sample: `id` (the original's id, the link back
to it, as in the source), `dataset`, `kind`, `messages` ([user, assistant]). Multi-turn samples are skipped.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.gradients.pairs import read_variants, rules_paraphrase, rules_variants, single_turn
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

SYSTEM_PROMPT = ("You are a paraphrasing expert who is specialized in rewriting text (questions, statements, etc.) "
                 "without altering the content. Keep in mind, that the meaning must not change after the "
                 "paraphrasing. Just output the paraphrased text without any additional information.")


class GeneratorConfig(Strict):
    backend: Literal["openai", "local", "rules"] = "openai"
    model: str = "gpt-4o-mini-2024-07-18"  # openai: the endpoint's model name
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(1.0, ge=0)
    local: ModelConfig | None = None  # local: the paraphrasing model (greedy decoding)
    max_new_tokens: int = Field(512, ge=1)
    timeout_s: float = Field(120, gt=0)

    @model_validator(mode="after")
    def _backend_needs(self):
        if self.backend == "local" and self.local is None:
            raise ValueError("generator.backend=local needs generator.local (a model config)")
        return self


class Config(RecipeConfig):
    kind: Literal["paraphrased", "model-generated"]
    data: DataConfig  # the originals, chat format (Tulu v2 LIMA rows)
    generator: GeneratorConfig = GeneratorConfig()  # paraphrased: who paraphrases
    paraphrased: RunRef | None = None  # model-generated: a kind=paraphrased make-variants run
    paraphrase_rules: bool = False  # model-generated without a paraphrased run: word-rule paraphrases of `data`
    model: ModelConfig | None = None  # model-generated: the model under study, greedy
    max_new_tokens: int = Field(512, ge=1)  # model-generated answers

    @model_validator(mode="after")
    def _dependencies(self):
        if self.data.format != "chat":
            raise ValueError("make-variants needs chat data (data.format: chat)")
        if self.kind == "model-generated" and ((self.paraphrased is None) == (not self.paraphrase_rules)
                                               or self.model is None):
            raise ValueError("kind=model-generated needs `model` (the model that answers) and one of `paraphrased` "
                             "(a kind=paraphrased make-variants run: make that first) or paraphrase_rules: true")
        return self


class OpenAIChat:
    """Paraphrases through an OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, cfg: GeneratorConfig, seed: int):
        import httpx

        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise UserError(f"generator.backend=openai needs an API key in ${cfg.api_key_env}; set it, or use "
                            "generator.backend=local with a local model")
        self.cfg, self.seed = cfg, seed
        self.client = httpx.Client(base_url=cfg.base_url, timeout=cfg.timeout_s,
                                   headers={"Authorization": f"Bearer {key}"})

    def __call__(self, text: str) -> str:
        import httpx

        body = {"model": self.cfg.model, "seed": self.seed, "temperature": self.cfg.temperature,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]}
        try:
            response = self.client.post("/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"].strip()
        except httpx.HTTPStatusError as err:
            raise UserError(f"{self.cfg.base_url}: HTTP {err.response.status_code}: {err.response.text[:200]}") from None
        except httpx.HTTPError as err:
            raise UserError(f"{self.cfg.base_url}: cannot reach the endpoint ({err})") from None


class Greedy:
    """Greedy chat completion with a local or hub model: the reply to `messages` (template applied)."""

    def __init__(self, model_cfg: ModelConfig, max_new_tokens: int, ctx):
        self.tokenizer = load_tokenizer(model_cfg)
        self.model = load_model(model_cfg, ctx=ctx).eval()
        self.max_new_tokens = max_new_tokens

    def reply(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        with torch.no_grad():
            out = self.model.generate(**ids.to(self.model.device), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def paraphraser(cfg: Config, ctx):
    g = cfg.generator
    if g.backend == "rules":
        return rules_paraphrase
    if g.backend == "openai":
        return OpenAIChat(g, cfg.seed)
    local = Greedy(g.local, g.max_new_tokens, ctx)
    return lambda text: local.reply([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}])


def run(cfg: Config, ctx) -> dict:
    rows_all = data.load_rows(cfg.data, ctx)
    originals = single_turn(rows_all)
    if cfg.kind == "paraphrased":
        paraphrase = paraphraser(cfg, ctx)
        rows = [{"id": r["id"], "dataset": r.get("dataset"), "kind": cfg.kind, "messages": [
            {"role": "user", "content": paraphrase(r["messages"][0]["content"])},
            {"role": "assistant", "content": paraphrase(r["messages"][1]["content"])}]}
            for r in ctx.progress(originals, desc="paraphrasing")]
    else:
        known = {r["id"] for r in originals}
        if cfg.paraphrase_rules:
            paraphrased = rules_variants(originals)
        else:
            dep = ctx.require(cfg.paraphrased, "make-variants")
            paraphrased = [r for r in read_variants(dep.path) if r["id"] in known]
            if not paraphrased:
                raise UserError(f"{dep.path}: no paraphrased sample has the id of an original in {cfg.data.name}")
        model = Greedy(cfg.model, cfg.max_new_tokens, ctx)
        rows = [{"id": r["id"], "dataset": r.get("dataset"), "kind": cfg.kind, "messages": [
            r["messages"][0], {"role": "assistant", "content": model.reply(r["messages"][:1])}]}
            for r in ctx.progress(paraphrased, desc="generating answers")]
    with open(ctx.dir / "variants.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    empty = sum(not r["messages"][1]["content"] for r in rows)
    return {"samples": len(rows), "skipped_multi_turn": len(rows_all) - len(originals),
            "empty_answers": empty}
