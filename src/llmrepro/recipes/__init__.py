"""Recipe registry: recipe name -> module, as plain data. Nothing is imported until a recipe is used.

Each recipe module defines:
    NAME: str                      the name used in experiment YAML (`recipe: NAME`)
    DESCRIPTION: str               one line, shown by `llmrepro list`
    SUPPORTS_RESUME: bool          whether `--resume` can continue an incomplete run
    class Config(RecipeConfig)     the typed parameter schema (pydantic, unknown keys rejected)
    def run(cfg, ctx) -> dict      does the work in ctx.dir and returns the metrics
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llmrepro.errors import UserError

RECIPES: dict[str, str] = {
    "instruct-sft": "llmrepro.recipes.instruct_sft",
    "extract-gradients": "llmrepro.recipes.extract_gradients",
    "score-gradients": "llmrepro.recipes.score_gradients",
    "projection-quality": "llmrepro.recipes.projection_quality",
    "memory-efficiency": "llmrepro.recipes.memory_efficiency",
    "fused-step-timing": "llmrepro.recipes.fused_step_timing",
    "memory-report": "llmrepro.recipes.memory_report",
    "make-variants": "llmrepro.recipes.make_variants",
    "gradient-similarity": "llmrepro.recipes.gradient_similarity",
    "layer-dot-products": "llmrepro.recipes.layer_dot_products",
    "layer-analysis": "llmrepro.recipes.layer_analysis",
}


def load_recipe(name: str) -> ModuleType:
    """Import the module of recipe `name`, with a did-you-mean error for unknown names."""
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown recipe '{name}'.{hint} Available: {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])
