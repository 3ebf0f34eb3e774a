"""What every recipe's config shares. Recipes subclass `RecipeConfig` and add their own typed fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RecipeConfig(Strict):
    seed: int = 42
    tracking: str | None = None  # "wandb" to log to Weights & Biases; off by default
