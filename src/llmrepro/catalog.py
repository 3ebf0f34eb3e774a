"""The experiment catalog: one YAML file per documented experiment under `experiments/<family>/<name>.yaml`.

A file names a recipe, its source project, what it measures, resource hints for clusters, the parameters,
and profiles (at least `smoke`: a tiny model on tiny data) that are merged over the parameters.
"""

from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from llmrepro import config
from llmrepro.errors import UserError
from llmrepro.recipes import load_recipe
from llmrepro.recipes.base import RecipeConfig, Strict

SOURCES = {
    "memory-truth": "Memory-efficient fine-tuning and truth representations (DTU master's thesis)",
    "gradient-projection": "Gradient dimensionality reduction for instance-based explainability",
    "gradient-similarity": "Gradient similarity and LLM layer analysis",
    "reprpo": "Representation preference optimization (ReprPO)",
    "instruction-tuning": "Instruction fine-tuning of foundation models",
}


class Resources(Strict):
    """Hints for cluster jobs (`invoke slurm`); the command line can override each."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(4, ge=1)
    mem: str = "16G"
    time: str = "04:00:00"


class ArrayTasks(Strict):
    """One array task per entry of `tasks` (dotted-key overrides) or per combination of `sweep` values."""

    tasks: list[dict[str, Any]] = []
    sweep: dict[str, list] = {}

    def model_post_init(self, _) -> None:
        if bool(self.tasks) == bool(self.sweep):
            raise ValueError("give either tasks or sweep (one of them, not empty)")

    def overrides(self) -> list[dict[str, Any]]:
        if self.tasks:
            return self.tasks
        return [dict(zip(self.sweep, combo, strict=True)) for combo in itertools.product(*self.sweep.values())]


class ArraySpec(ArrayTasks):
    """How `invoke slurm --array` splits the experiment: its tasks (per profile if `profiles` names it), each
    task's overrides applied over the profile, then one dependent run with the `merge` overrides."""

    merge: dict[str, Any] | None = None
    profiles: dict[str, ArrayTasks] = {}

    def task_overrides(self, profile: str | None) -> list[dict[str, Any]]:
        return (self.profiles.get(profile) or self).overrides()


class ExperimentFile(Strict):
    recipe: str
    source: str
    description: str
    measures: str
    resources: Resources = Resources()
    array: ArraySpec | None = None  # how a cluster array job splits it (`invoke slurm --array`)
    params: dict = {}
    profiles: dict[str, dict] = {}


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    spec: ExperimentFile

    def params(self, profile: str | None = None, overrides: list[str] = ()) -> dict:
        """The raw parameters: base, then the profile merged over them, then the overrides."""
        params = self.spec.params
        if profile is not None:
            if profile not in self.spec.profiles:
                known = ", ".join(sorted(self.spec.profiles)) or "none"
                raise UserError(f"experiment '{self.name}' has no profile '{profile}' (profiles: {known})")
            params = config.deep_merge(params, self.spec.profiles[profile])
        return config.apply_overrides(params, list(overrides))

    def resolve(self, profile: str | None = None, overrides: list[str] = ()) -> RecipeConfig:
        """Validated recipe config; raises UserError naming every bad key path."""
        recipe = load_recipe(self.spec.recipe)
        where = f"{self.name}" + (f" (profile {profile})" if profile else "")
        return config.validate(recipe.Config, self.params(profile, overrides), where)


def experiments_dir() -> Path:
    if env := os.environ.get("LLMREPRO_EXPERIMENTS"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / "experiments"


def _read(path: Path, name: str) -> Experiment:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    try:
        spec = ExperimentFile.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {config.format_validation_error(err, prefix=name)}") from None
    if spec.source not in SOURCES:
        raise UserError(f"{path}: unknown source '{spec.source}' (known: {', '.join(SOURCES)})")
    return Experiment(name, path, spec)


def names(root: Path | None = None) -> list[str]:
    root = root or experiments_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load(name: str, root: Path | None = None) -> Experiment:
    root = root or experiments_dir()
    path = root / f"{name}.yaml"
    if not path.is_file():
        known = names(root)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown experiment '{name}'.{hint} See `llmrepro list`.")
    return _read(path, name)


def load_all(root: Path | None = None) -> list[Experiment]:
    return [load(name, root) for name in names(root)]
