"""The experiment catalog: one YAML file per documented experiment under `experiments/<family>/<name>.yaml`.

A file names a recipe, its source project, what it measures, resource hints for clusters, the parameters,
profiles (at least `smoke`: a tiny model on tiny data) that are merged over the parameters, and the
figures the source published (`reference:`), which every run shows next to its own.

`Experiment.run_spec(profile, overrides)` validates once and returns the `RunSpec` that `runs.execute` runs.
"""

from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from llmrepro.core import config, registry
from llmrepro.core.config import RecipeConfig, Strict
from llmrepro.core.errors import UserError


@dataclass(frozen=True)
class Source:
    """A source project: what it studied, its public repository and the commit our experiments follow."""

    title: str
    repository: str
    commit: str


SOURCES = {
    "memory-truth": Source("Memory-efficient fine-tuning and truth representations (DTU master's thesis)",
                           "MikkelGodsk/Masters-thesis", "b51c7f1"),
    "gradient-projection": Source("Gradient dimensionality reduction for instance-based explainability",
                                  "DarynaKalinchuk/Gradient_dimensionality_reduction", "d73147d"),
    "gradient-similarity": Source("Gradient similarity and LLM layer analysis",
                                  "lukas-hinterleitner/master-thesis", "e6ebdbe"),
    "reprpo": Source("Representation preference optimization (ReprPO), its July 2024 history",
                     "wassname/repr-preference-optimization", "00a471c"),
    "instruction-tuning": Source("Instruction fine-tuning of foundation models (databricks' Dolly trainer)",
                                 "databrickslabs/dolly", "e2d664d"),
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


class Reference(Strict):
    """A figure the source published, shown next to the measured one in metrics.json, reports and `compare`."""

    metric: str  # the name of the recipe's metric it corresponds to
    value: float
    where: str  # the source's file, table or notebook cell it comes from
    tolerance: float | None = Field(None, ge=0)  # |measured - published| that still counts as a match
    note: str | None = None


class ExperimentFile(Strict):
    recipe: str
    source: str
    description: str  # one line: what the experiment is (`llmrepro list`)
    measures: str  # what its metrics and artifacts are
    resources: Resources = Resources()
    array: ArraySpec | None = None  # how a cluster array job splits it (`invoke slurm --array`)
    reference: list[Reference] = []
    params: dict = {}
    profiles: dict[str, dict] = {}


@dataclass
class RunSpec:
    """What to run: an experiment's validated config, and where it came from. Made once by `run_spec`."""

    experiment: str
    recipe: str
    cfg: RecipeConfig
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)

    @cached_property
    def params(self) -> dict:
        return self.cfg.model_dump(mode="json")

    @property
    def config_hash(self) -> str:
        return config.config_hash(self.recipe, self.params)

    @property
    def default_run_id(self) -> str:
        return f"{self.profile or 'default'}-{self.config_hash[:10]}"


def recipe_config(recipe: str) -> type[RecipeConfig]:
    return registry.get(recipe).load().Config


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    spec: ExperimentFile

    @property
    def source(self) -> Source:
        return SOURCES[self.spec.source]

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
        where = f"{self.name}" + (f" (profile {profile})" if profile else "")
        return config.validate(recipe_config(self.spec.recipe), self.params(profile, overrides), where)

    def run_spec(self, profile: str | None = None, overrides: list[str] = ()) -> RunSpec:
        """The validated run of this experiment with `profile` and `overrides`."""
        return RunSpec(self.name, self.spec.recipe, self.resolve(profile, overrides), profile, list(overrides),
                       list(self.spec.reference))


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader: ~7x faster, same result


def experiments_dir() -> Path:
    if env := os.environ.get("LLMREPRO_EXPERIMENTS"):
        return Path(env)
    return Path(__file__).resolve().parents[3] / "experiments"


def _read(path: Path, name: str) -> Experiment:
    try:
        raw = yaml.load(path.read_text(), Loader=_YAML_LOADER)
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
    try:
        registry.get(spec.recipe)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
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


def dependency_order(names: list[str], profile: str | None = "smoke") -> list[str]:
    """`names` with every experiment after the ones its config (with `profile`) reads; catalog order otherwise."""
    deps = {n: [r.experiment for r in load(n).resolve(profile).dependencies() if r.experiment in names] for n in names}
    ordered: list[str] = []

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in stack:
            raise UserError(f"experiments read each other's runs in a circle: {' -> '.join((*stack, name))}")
        for dep in deps[name]:
            visit(dep, (*stack, name))
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def table(fmt: str = "text") -> str:
    """`llmrepro list`: every experiment with its source, recipe and description (markdown: the README's table)."""
    from llmrepro.core import io

    code = (lambda x: f"`{x}`") if fmt == "markdown" else (lambda x: x)
    rows = [[code(e.name), e.spec.source, code(e.spec.recipe), e.spec.description] for e in load_all()]
    return io.table(rows, ["experiment", "source", "recipe", "description"], fmt)
