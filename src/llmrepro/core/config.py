"""Config: the base classes of every recipe config, and resolving an experiment's parameters (profile merge,
dotted overrides, validation against the recipe schema).

Every error names the key path (`params.model.dtype: ...`) and all of them are reported at once.
"""

from __future__ import annotations

import copy
import json
import re

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from llmrepro.core import io
from llmrepro.core.errors import UserError


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RecipeConfig(Strict):
    """What every recipe's config shares; recipes subclass it and add their own typed fields."""

    seed: int = 42
    tracking: str | None = None  # "wandb" to log to Weights & Biases; off by default

    def dependencies(self) -> list[RunRef]:
        """The runs this config reads (its `RunRef` sections): `llmrepro smoke` runs them first."""
        return [ref for ref in walk(self, RunRef) if ref.experiment is not None]


class RunRef(Strict):
    """Another run: `experiment` (+ `profile`, `overrides` or `run_id`) under this run's output root, or `run_dir`."""

    experiment: str | None = None
    profile: str | None = None
    overrides: list[str] = []
    run_id: str | None = None  # default: the run id the experiment's config gives (<profile>-<config hash>)
    run_dir: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.experiment is None) == (self.run_dir is None):
            raise ValueError("give either experiment (with profile, overrides or run_id) or run_dir")
        if self.run_dir is not None and (self.profile or self.overrides or self.run_id):
            raise ValueError("run_dir names one run directory: drop profile, overrides and run_id")
        return self

    def describe(self) -> str:
        if self.run_dir is not None:
            return self.run_dir
        return self.experiment + (f" (profile {self.profile})" if self.profile else "") + \
            (f" {' '.join(self.overrides)}" if self.overrides else "")

    def command(self) -> str:
        """The command that makes the run this reference names."""
        parts = ["llmrepro run", self.experiment or "?"]
        parts += [f"--profile {self.profile}"] if self.profile else []
        parts += [f"--run-id {self.run_id}"] if self.run_id else []
        return " ".join(parts + list(self.overrides))


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def deep_merge(base: dict, update: dict) -> dict:
    """`update` merged into a copy of `base`: nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=1` -> (['a', 'b'], 1); the value is read as a YAML scalar (numbers, bools, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"bad override '{text}': expected dotted key=value, e.g. model.name=tiny-llama")
    if _SCIENTIFIC.fullmatch(raw):  # YAML 1.1 reads 5e-6 as a string
        return key.split("."), float(raw)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(params)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"bad override '{text}': params.{'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def format_validation_error(err: ValidationError, prefix: str = "params") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def validate(schema: type[BaseModel], params: dict, where: str) -> BaseModel:
    try:
        return schema.model_validate(params)
    except ValidationError as err:
        raise UserError(f"{where}: invalid config: {format_validation_error(err)}") from None


def config_hash(recipe: str, params: dict) -> str:
    blob = json.dumps({"recipe": recipe, "params": params}, sort_keys=True, default=str)
    return io.sha256_text(blob)


def walk(value, kind: type):
    """Every instance of `kind` inside a config (nested sections, lists and dicts), depth first."""
    if isinstance(value, kind):
        yield value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from walk(getattr(value, name), kind)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from walk(item, kind)
    elif isinstance(value, dict):
        for item in value.values():
            yield from walk(item, kind)
