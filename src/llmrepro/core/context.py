"""What a recipe's `run(cfg, ctx)` gets: where to write, what it is, provenance hooks, and other runs.

    ctx = RunContext(dir=tmp_path)                         # on its own, in a test
    path = ctx.require(cfg.train, recipe="extract-gradients")   # a finished run this one reads

`RunRef` (core.config) is the config section that names another run: an experiment (with profile and
overrides, so its run id follows from its config hash, or an explicit run id), or a run directory. Resolving
it checks that
the run exists, finished and ran the expected recipe, each failure as one line that says what to run;
every run resolved is recorded under `depends_on` in the manifest (its run id and config hash).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmrepro.core import catalog, io, tracking
from llmrepro.core.config import RunRef
from llmrepro.core.errors import UserError
from llmrepro.core.progress import progress

log = logging.getLogger("llmrepro")


@dataclass
class Dependency:
    """A resolved `RunRef`: the finished run directory and what it was."""

    path: Path
    experiment: str
    recipe: str
    run_id: str
    config_hash: str
    params: dict

    def record(self) -> dict:
        return {"experiment": self.experiment, "recipe": self.recipe, "run_id": self.run_id,
                "config_hash": self.config_hash, "path": str(self.path)}


def read_finished(path: Path, what: str) -> tuple[dict, dict]:
    """(manifest, config.yaml) of a finished run directory; one-line errors for anything else."""
    manifest_path, config_path = path / "manifest.json", path / "config.yaml"
    if not manifest_path.is_file() or not config_path.is_file():
        partial = path.with_name(f"{path.name}.partial")
        if partial.is_dir():
            status = _status(partial)
            raise UserError(f"{what}: the run at {partial} is unfinished (status {status}); "
                            "finish it with --resume, or run it again with --force")
        raise UserError(f"{what}: no finished run at {path}")
    manifest = io.read_json(manifest_path)
    if manifest.get("status") != "complete":
        raise UserError(f"{what}: the run at {path} is not complete (status {manifest.get('status')})")
    return manifest, yaml.safe_load(config_path.read_text())


def _status(partial: Path) -> str:
    try:
        return io.read_json(partial / "manifest.json").get("status", "unknown")
    except (OSError, ValueError):
        return "unknown"


@dataclass
class RunContext:
    """Handed to a recipe's `run(cfg, ctx)`. Every field but `dir` has a default, so tests build one directly."""

    dir: Path
    experiment: str = "test/run"
    run_id: str = "test"
    profile: str | None = None
    output_root: Path | None = None  # default: three levels above dir (<root>/<family>/<name>/<run>)
    resume: bool = False
    tracking: bool = False  # whether a tracker (wandb) is active for this run
    log: logging.Logger = log
    manifest: dict = field(default_factory=lambda: {"inputs": {}, "depends_on": []})

    def __post_init__(self):
        self.dir = Path(self.dir)
        if self.output_root is None:
            self.output_root = self.dir.parents[len(Path(self.experiment).parts)]
        self.manifest.setdefault("inputs", {})
        self.manifest.setdefault("depends_on", [])

    # ----------------------------------------------------------------------------------------- provenance

    def record_input(self, kind: str, name: str, **details) -> None:
        """Record a model or dataset the run used (revision, local path, sha256 ...) in the manifest."""
        entry = {"name": name, **{k: v for k, v in details.items() if v is not None}}
        if entry not in self.manifest["inputs"].setdefault(kind, []):
            self.manifest["inputs"][kind].append(entry)

    def progress(self, iterable=None, **kwargs):
        return progress(iterable, **kwargs)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.log.info("step %s: %s", step, {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()})
        tracking.log(metrics, step)

    # ----------------------------------------------------------------------------------------- other runs

    def locate(self, ref: RunRef) -> Path:
        """The directory a reference names (whether or not a run is there)."""
        if ref.run_dir is not None:
            return Path(ref.run_dir).expanduser()
        exp = catalog.load(ref.experiment)
        run_id = ref.run_id or exp.run_spec(ref.profile, ref.overrides).default_run_id
        return self.output_root / exp.name / run_id

    def require(self, ref: RunRef, recipe: str | tuple[str, ...]) -> Dependency:
        """The finished run `ref` names, which must have run `recipe`; recorded under `depends_on`."""
        recipes = (recipe,) if isinstance(recipe, str) else recipe
        if ref.experiment is not None:
            exp = catalog.load(ref.experiment)
            if exp.spec.recipe not in recipes:
                raise UserError(f"{ref.experiment} runs recipe {exp.spec.recipe}, not {' or '.join(recipes)}")
        path = self.locate(ref)
        try:
            manifest, cfg = read_finished(path, f"needs {ref.describe()}")
        except UserError as err:
            hint = f"; run `{ref.command()}` first" if ref.experiment and "no finished run" in str(err) else ""
            raise UserError(f"{err}{hint}") from None
        if cfg.get("recipe") not in recipes:
            raise UserError(f"{path} is a run of recipe {cfg.get('recipe')}, not {' or '.join(recipes)}")
        dep = Dependency(path, manifest["experiment"], cfg["recipe"], manifest["run_id"], manifest["config_hash"],
                         cfg["params"])
        if dep.record() not in self.manifest["depends_on"]:
            self.manifest["depends_on"].append(dep.record())
        return dep

    def find(self, ref: RunRef, recipe: str | tuple[str, ...]) -> Dependency | None:
        """Like `require`, but None when no finished run is there (for reports that list what is missing)."""
        path = self.locate(ref)
        if not (path / "manifest.json").is_file() or io.read_json(path / "manifest.json").get("status") != "complete":
            return None
        return self.require(ref, recipe)
