"""make-variants: paraphrased and model-generated versions of LIMA samples, for new models or paraphrasers.

Reproduces the gradient-similarity project's `paraphrase.py` (lukas-hinterleitner/master-thesis @ e6ebdbe):
- originals: the Tulu v2 mixture rows with `dataset == "lima"` and exactly two messages (988 rows);
- `paraphrased`: the question and the answer paraphrased separately by an LLM with the source's system
  prompt (`src/paraphrasing.py`: gpt-4o-mini-2024-07-18, temperature 1, seed 42), the reply kept as it
  comes (not stripped);
- `model-generated`: the paraphrased question answered by the model under study, greedy, float32, with
  open-instruct's tulu template forced; the answer cut out of the decoded text as the source did (after the
  first "\\n<|assistant|>\\n", up to the first EOS string, stripped). `max_new_tokens: 512` is what
  produced the published dataset (`src/model_operations.py` @ 67887e0, dataset committed in 3347c68);
  `max_new_tokens: context` is the source's later rule (since ad0a140): the model's context length minus
  the prompt length.

gpt-4o-mini at temperature 1 cannot be regenerated exactly, so the reproduction experiments read the
published datasets (`variants_data` of gradient-similarity / layer-dot-products); this recipe is for new
models and paraphrasers. The model-generated kind reads its paraphrased questions from the published
dataset (`paraphrased_data`), a paraphrased make-variants run (`paraphrased`), or word rules.

Generators are pluggable: `openai` (any OpenAI-compatible chat endpoint, called with httpx; the key is read
from the environment variable `api_key_env`), `local` (a local or hub model through transformers, greedy),
and `rules` (a fixed word-substitution rewording, no model: for tests and for self-contained smoke runs of
the recipes downstream; it is not a paraphraser worth studying).

Output: `variants.jsonl` in the run directory, one row per sample: `id` (the original's id, the link back
to it, as in the source), `dataset`, `kind`, `messages` ([user, assistant]).

Deliberate differences from the source:
- the tulu template is forced (`chat_template: tulu`); the version that made the published data (67887e0)
  set it only when the tokenizer had none, later versions (from e351692) forced it; `chat_template: model`
  uses the tokenizer's own;
- when no EOS is generated, `answer_extraction: source` drops the answer's last character as the source's
  `decoded[start:-1]` did; `clean` decodes only the new tokens, without special tokens, stripped;
- with `max_new_tokens: context`, a prompt that fills the context gets an empty answer (the source would
  have called generate with a budget <= 0);
- the local paraphraser (`generator.backend: local`) is ours; the source only used the OpenAI API.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.gradients.pairs import VARIANT_COLUMNS, lima_rows, read_variants, rules_variants, variant_rows
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.fixtures.chat import rules_paraphrase
from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer

# the source's system prompt, whitespace included (a triple-quoted string in src/paraphrasing.py)
SYSTEM_PROMPT = ("\nYou are a paraphrasing expert who is specialized in rewriting text (questions, statements, etc.) "
                 "without altering the content. \nKeep in mind, that the meaning must not change after the "
                 "paraphrasing. \nJust output the paraphrased text without any additional information.\n")
ASSISTANT_MARK = "\n<|assistant|>\n"


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
    data: DataConfig  # the originals, chat format (the Tulu v2 mixture)
    dataset_filter: str | None = "lima"  # keep rows with this `dataset` (and exactly two messages); None: any
    generator: GeneratorConfig = GeneratorConfig()  # paraphrased: who paraphrases
    paraphrased_data: DataConfig | None = None  # model-generated: published paraphrases (format paraphrased)
    paraphrased: RunRef | None = None  # model-generated: or a kind=paraphrased make-variants run
    paraphrase_rules: bool = False  # model-generated: or word-rule paraphrases of `data`
    model: ModelConfig | None = None  # model-generated: the model under study, greedy
    max_new_tokens: int | Literal["context"] = 512  # 512: the published data; context: the source's later rule
    chat_template: Literal["tulu", "model"] = "tulu"  # model-generated: tulu (open-instruct's), forced as the source
    answer_extraction: Literal["source", "clean"] = "source"

    @model_validator(mode="after")
    def _dependencies(self):
        if self.data.format != "chat":
            raise ValueError("make-variants needs chat data (data.format: chat)")
        if isinstance(self.max_new_tokens, int) and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1 (or 'context')")
        if self.kind == "model-generated":
            given = (self.paraphrased_data is not None) + (self.paraphrased is not None) + self.paraphrase_rules
            if given != 1 or self.model is None:
                raise ValueError("kind=model-generated needs `model` (the model that answers) and one of "
                                 "`paraphrased_data` (the published paraphrases), `paraphrased` (a kind=paraphrased "
                                 "make-variants run: make that first) or paraphrase_rules: true")
            if self.paraphrased_data is not None and self.paraphrased_data.format not in VARIANT_COLUMNS:
                raise ValueError(f"paraphrased_data.format must be one of {', '.join(VARIANT_COLUMNS)}")
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
            return response.json()["choices"][0]["message"]["content"]  # unstripped, as the source
        except httpx.HTTPStatusError as err:
            raise UserError(f"{self.cfg.base_url}: HTTP {err.response.status_code}: {err.response.text[:200]}") from None
        except httpx.HTTPError as err:
            raise UserError(f"{self.cfg.base_url}: cannot reach the endpoint ({err})") from None


def source_answer(decoded: str, eos_token: str) -> str:
    """The source's cut of the answer out of the decoded prompt + generation: after the first assistant
    mark, up to the first EOS string (when there is none, `find` gives -1 and the last character is lost)."""
    start = decoded.find(ASSISTANT_MARK) + len(ASSISTANT_MARK)
    return decoded[start:decoded.find(eos_token)].strip()


class Greedy:
    """Greedy chat completion with a local or hub model: the reply to `messages`."""

    def __init__(self, model_cfg: ModelConfig, max_new_tokens: int | str, ctx, template: str | None = None,
                 extraction: str = "clean"):
        from llmrepro.lm.models import default_device

        self.tokenizer = load_tokenizer(model_cfg)
        self.model = load_model(model_cfg, ctx=ctx).eval()
        if model_cfg.device_map is None:
            self.model.to(default_device())
        self.max_new_tokens, self.template, self.extraction = max_new_tokens, template, extraction

    def budget(self, prompt_len: int) -> int:
        if self.max_new_tokens == "context":
            return self.model.config.max_position_embeddings - prompt_len
        return self.max_new_tokens

    def reply(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True, chat_template=self.template)
        prompt = ids["input_ids"].to(self.model.device)
        budget = self.budget(prompt.shape[1])
        if budget < 1:
            return ""
        with torch.no_grad():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=budget,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        if self.extraction == "source":
            return source_answer(self.tokenizer.decode(out[0]), self.tokenizer.eos_token)
        return self.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()


def paraphraser(cfg: Config, ctx):
    g = cfg.generator
    if g.backend == "rules":
        return rules_paraphrase
    if g.backend == "openai":
        return OpenAIChat(g, cfg.seed)
    local = Greedy(g.local, g.max_new_tokens, ctx)
    return lambda text: local.reply([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}])


def paraphrased_questions(cfg: Config, originals: list[dict], ctx) -> list[dict]:
    """The paraphrased rows whose id is an original's, in their own order."""
    known = {r["id"] for r in originals}
    if cfg.paraphrase_rules:
        return rules_variants(originals)
    if cfg.paraphrased_data is not None:
        rows = variant_rows(data.load_rows(cfg.paraphrased_data, ctx), cfg.paraphrased_data.format,
                            cfg.paraphrased_data.name)
        where = cfg.paraphrased_data.name
    else:
        dep = ctx.require(cfg.paraphrased, "make-variants")
        rows, where = read_variants(dep.path), str(dep.path)
    rows = [r for r in rows if r["id"] in known]
    if not rows:
        raise UserError(f"{where}: no paraphrased sample has the id of an original in {cfg.data.name}")
    return rows


def run(cfg: Config, ctx) -> dict:
    from llmrepro.lm import templates

    rows_all = data.load_rows(cfg.data, ctx)
    originals = lima_rows(rows_all, cfg.dataset_filter)
    if not originals:
        raise UserError(f"{cfg.data.name}: no rows with dataset == {cfg.dataset_filter!r} and exactly two messages")
    dataset_of = {r["id"]: r.get("dataset") for r in originals}
    if cfg.kind == "paraphrased":
        paraphrase = paraphraser(cfg, ctx)
        rows = [{"id": r["id"], "dataset": r.get("dataset"), "kind": cfg.kind, "messages": [
            {"role": "user", "content": paraphrase(r["messages"][0]["content"])},
            {"role": "assistant", "content": paraphrase(r["messages"][1]["content"])}]}
            for r in ctx.progress(originals, desc="paraphrasing")]
    else:
        paraphrased = paraphrased_questions(cfg, originals, ctx)
        template = templates.CHAT_TEMPLATES[cfg.chat_template] if cfg.chat_template != "model" else None
        model = Greedy(cfg.model, cfg.max_new_tokens, ctx, template, cfg.answer_extraction)
        rows = [{"id": r["id"], "dataset": dataset_of[r["id"]], "kind": cfg.kind, "messages": [
            r["messages"][0], {"role": "assistant", "content": model.reply(r["messages"][:1])}]}
            for r in ctx.progress(paraphrased, desc="generating answers")]
    with open(ctx.dir / "variants.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    empty = sum(not r["messages"][1]["content"] for r in rows)
    return {"samples": len(rows), "skipped_rows": len(rows_all) - len(originals), "empty_answers": empty}
