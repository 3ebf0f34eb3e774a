"""The recipe registry: one literal list of records, nothing imported until a recipe runs.

A recipe is one module under `llmrepro.recipes` that defines
    class Config(RecipeConfig)     its typed parameters (pydantic; unknown keys rejected); importing the
                                   module must stay light (no torch): `validate` and `show` load every Config
    def run(cfg, ctx) -> dict      does the work in ctx.dir and returns the metrics
Everything else about it lives here: its one-line description, whether `--resume` can continue an
incomplete run, whether it runs under torchrun, and which recipes' runs it reads (`RunRef` fields of its
config name runs of those recipes; `tests/core/test_registry.py` checks both ways).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from types import ModuleType

from llmrepro.core.errors import UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    module: str
    description: str
    supports_resume: bool = False
    supports_distributed: bool = False
    depends_on: tuple[str, ...] = ()

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


RECIPES: list[Recipe] = [
    Recipe("instruct-sft", "llmrepro.recipes.instruct_sft",
           "Instruction SFT with the Dolly template and completion-only loss (transformers Trainer)",
           supports_resume=True, supports_distributed=True),
    Recipe("extract-gradients", "llmrepro.recipes.extract_gradients",
           "Per-sample loss gradients (inputs_embeds | parameters | lora), randomly projected, in shards",
           supports_resume=True),
    Recipe("score-gradients", "llmrepro.recipes.score_gradients",
           "Rank train samples per test sample by gradient dot product or cosine; top-k JSON with the text",
           depends_on=("extract-gradients",)),
    Recipe("projection-quality", "llmrepro.recipes.projection_quality",
           "Kendall tau, Spearman rho and NDCG of projected vs full gradient rankings, per type and dim",
           depends_on=("extract-gradients",)),
    Recipe("memory-efficiency", "llmrepro.recipes.memory_efficiency",
           "Peak memory, memory timeline and step time: standard backprop vs optimizer step fused into backward"),
    Recipe("fused-step-timing", "llmrepro.recipes.fused_step_timing",
           "Iteration time of a small dense net: standard vs fused optimizer step, bootstrap 95% CI"),
    Recipe("memory-report", "llmrepro.recipes.memory_report",
           "Markdown table and bar plot of peak memory and step time across memory-efficiency runs",
           depends_on=("memory-efficiency",)),
    Recipe("make-variants", "llmrepro.recipes.make_variants",
           "Paraphrased / model-generated versions of LIMA samples (OpenAI-compatible, local model or rules)",
           depends_on=("make-variants",)),
    Recipe("gradient-similarity", "llmrepro.recipes.gradient_similarity",
           "Cosine of paraphrased vs BM25-candidate original gradients, full or randomly projected (streamed)",
           depends_on=("make-variants",)),
    Recipe("layer-dot-products", "llmrepro.recipes.layer_dot_products",
           "Per-tensor gradient dot products p.o, p.p, o.o of paraphrased vs BM25-candidate originals (streamed)",
           depends_on=("make-variants",)),
    Recipe("layer-analysis", "llmrepro.recipes.layer_analysis",
           "Per-tensor accuracy and similarity to full gradient, greedy layer selection, vs the source; plots",
           depends_on=("layer-dot-products", "gradient-similarity")),
    Recipe("cache-activations", "llmrepro.recipes.cache_activations",
           "Per-head o_proj inputs and residual streams at the last token of truth statements, streamed to disk",
           supports_resume=True),
    Recipe("truth-probes", "llmrepro.recipes.truth_probes",
           "Truth probes per layer (logistic, mass-mean, iid, SVMs, MLP, trees), grouped CV, vs the model's judgement",
           depends_on=("cache-activations",)),
    Recipe("iti", "llmrepro.recipes.iti",
           "Inference-time intervention on TruthfulQA: head ranking, (alpha, K) grid, held-out and OOD MC scores",
           depends_on=("cache-activations",)),
    Recipe("mc-eval", "llmrepro.recipes.mc_eval",
           "Multiple-choice scoring (thesis MCCLA, honest_llama MC1/MC2, ReprPO numbered), base, adapter or ITI",
           depends_on=("iti", "dpo", "reprpo", "instruct-sft")),
    Recipe("dpo", "llmrepro.recipes.dpo",
           "DPO baseline (TRL DPOTrainer) on a LoRA adapter; TruthfulQA MC1 and reward / pair accuracies vs base",
           supports_resume=True),
    Recipe("reprpo", "llmrepro.recipes.reprpo",
           "ReprPO: hidden-state preference losses (mse, direction, topk, cka, symlog, ...) on a LoRA adapter",
           supports_resume=True),
]

_BY_NAME = {r.name: r for r in RECIPES}


def names() -> list[str]:
    return [r.name for r in RECIPES]


def get(name: str) -> Recipe:
    """The record of recipe `name`, with a did-you-mean error for unknown names."""
    if name not in _BY_NAME:
        close = difflib.get_close_matches(name, _BY_NAME, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown recipe '{name}'.{hint} Available: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def register(recipe: Recipe) -> None:
    """Add a recipe record at run time (tests register a probe recipe this way)."""
    RECIPES.append(recipe)
    _BY_NAME[recipe.name] = recipe


def unregister(name: str) -> None:
    RECIPES.remove(_BY_NAME.pop(name))
