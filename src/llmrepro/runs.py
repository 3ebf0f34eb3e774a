"""Runs: one directory per run, written atomically, with the resolved config, a manifest and the metrics.

Layout: `<output-root>/<experiment>/<run-id>/` holding `config.yaml`, `manifest.json`, `metrics.json`,
`run.log` and the recipe's artifacts. The run id is `<profile>-<config hash>`, so the same config maps to
the same directory: a finished run is never overwritten without `force`, and `resume` finds its
incomplete sibling again.

Work happens in `<run-id>.partial/`, renamed to `<run-id>/` only on success. A run that fails or is
interrupted stays `.partial` with `"status": "failed"|"interrupted"` in its manifest, so it never looks
complete. Bad input (a `UserError`) removes what this invocation created: nothing half-written remains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from llmrepro import config, provenance, tracking
from llmrepro.errors import UserError
from llmrepro.progress import progress
from llmrepro.recipes import load_recipe
from llmrepro.recipes.base import RecipeConfig

log = logging.getLogger("llmrepro")


def output_root(output_dir: str | Path | None = None) -> Path:
    return Path(output_dir or os.environ.get("LLMREPRO_OUTPUT_DIR") or "outputs")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite(value):
    """NaN and infinities as null: standard JSON has no such numbers and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write standard JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


@dataclass
class RunSpec:
    """What to run: a recipe and its validated parameters, and where they came from."""

    experiment: str
    recipe: str
    params: dict
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def config_hash(self) -> str:
        return config.config_hash(self.recipe, self.params)

    @property
    def default_run_id(self) -> str:
        return f"{self.profile or 'default'}-{self.config_hash[:10]}"


@dataclass
class RunContext:
    """Handed to a recipe's `run(cfg, ctx)`: where to write, whether resuming, and provenance hooks."""

    dir: Path
    resume: bool
    log: logging.Logger
    manifest: dict

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


def _add_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if log.getEffectiveLevel() > logging.INFO:  # the run log always has the run's own messages
        log.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def execute(spec: RunSpec, output_dir: str | Path | None = None, *, run_id: str | None = None,
            resume: bool = False, force: bool = False) -> Path:
    """Validate, run the recipe in a `.partial` directory, and publish it. Returns the final run directory."""
    recipe = load_recipe(spec.recipe)
    cfg: RecipeConfig = config.validate(recipe.Config, spec.params, spec.experiment)
    params = cfg.model_dump(mode="json")
    spec = RunSpec(spec.experiment, spec.recipe, params, spec.profile, list(spec.overrides))
    run_id = run_id or spec.default_run_id
    exp_dir = output_root(output_dir) / spec.experiment
    final, partial = exp_dir / run_id, exp_dir / f"{run_id}.partial"

    rank, group = _distributed()
    resuming, created = _on_rank0(group, lambda: _claim(recipe, spec, final, partial, resume, force))
    if rank > 0:
        return _follow(recipe, cfg, partial, final, resuming, group)

    manifest = _start_manifest(spec, run_id, partial, resuming)
    (partial / "config.yaml").write_text(yaml.safe_dump(
        {"experiment": spec.experiment, "recipe": spec.recipe, "profile": spec.profile,
         "overrides": spec.overrides, "params": params}, sort_keys=False))
    handler = _add_log_file(partial / "run.log")
    ctx = RunContext(partial, resuming, log, manifest)
    started = time.perf_counter()
    try:
        write_json(partial / "manifest.json", manifest)
        log.info("run %s/%s (%s) in %s", spec.experiment, run_id, spec.recipe, partial)
        _seed_everything(cfg.seed)
        manifest["tracking"] = tracking.start(cfg, spec, run_id, partial)
        metrics = recipe.run(cfg, ctx)
    except UserError:
        _discard(partial, created, resuming)
        raise
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        manifest.update(status=status, error=f"{type(err).__name__}: {err}", finished=_now(),
                        duration_s=round(time.perf_counter() - started, 3))
        write_json(partial / "manifest.json", manifest)
        log.error("run %s: %s (kept at %s)", status, err, partial)
        raise
    finally:
        tracking.finish()
        logging.getLogger().removeHandler(handler)
        handler.close()

    if group is not None:  # every rank has finished writing before the directory is renamed
        import torch.distributed as dist

        dist.barrier(group)
    write_json(partial / "metrics.json", metrics)
    manifest.update(status="complete", finished=_now(), duration_s=round(time.perf_counter() - started, 3),
                    metrics=metrics)
    write_json(partial / "manifest.json", manifest)
    _publish(partial, final)
    log.info("run complete: %s", final)
    return final


def _claim(recipe, spec: RunSpec, final: Path, partial: Path, resume: bool, force: bool) -> tuple[bool, list[Path]]:
    """Check for an earlier run of this id and make the `.partial` directory: (resuming, directories created)."""
    if final.exists() and not force:
        raise UserError(f"a finished run already exists at {final}; pass --force to replace it")
    resuming = False
    if partial.exists():
        if resume and not recipe.SUPPORTS_RESUME:
            raise UserError(f"recipe '{spec.recipe}' cannot resume; pass --force to start {partial} over")
        if resume:
            resuming = True
        elif force:
            shutil.rmtree(partial)
        else:
            raise UserError(f"an incomplete run exists at {partial}; pass --resume to continue it "
                            "or --force to start over")
    created = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
    partial.mkdir(parents=True, exist_ok=True)
    return resuming, created


def _distributed() -> tuple[int, object]:
    """(rank, a gloo group for coordination) under torchrun with several processes, else (0, None).

    Rank 0 alone claims, records and publishes the run directory; the other ranks train in the same
    `.partial` directory (Trainer writes checkpoints from rank 0 only).
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group()  # env:// from torchrun; Trainer (accelerate) reuses this group
    return dist.get_rank(), dist.new_group(backend="gloo")


def _on_rank0(group, fn):
    """`fn()` on rank 0, its result or its UserError shared with every rank; plain `fn()` without torchrun."""
    if group is None:
        return fn()
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (None, fn())
        except UserError as err:
            box[0] = (str(err), None)
    dist.broadcast_object_list(box, src=0, group=group)
    error, result = box[0]
    if error:
        raise UserError(error)
    return result


def _follow(recipe, cfg: RecipeConfig, partial: Path, final: Path, resuming: bool, group) -> Path:
    """A rank other than 0: run the recipe in rank 0's `.partial` directory, then wait for everyone."""
    import torch.distributed as dist

    _seed_everything(cfg.seed)
    recipe.run(cfg, RunContext(partial, resuming, log, {"inputs": {}}))
    dist.barrier(group)
    return final


def _start_manifest(spec: RunSpec, run_id: str, partial: Path, resuming: bool) -> dict:
    previous = {}
    if resuming and (partial / "manifest.json").exists():
        previous = json.loads((partial / "manifest.json").read_text())
    return {
        "schema": 1,
        "experiment": spec.experiment,
        "recipe": spec.recipe,
        "profile": spec.profile,
        "overrides": spec.overrides,
        "run_id": run_id,
        "config_hash": spec.config_hash,
        "seeds": {"seed": spec.params.get("seed")},
        "status": "running",
        "started": _now(),
        "resumed_from": previous.get("status") if resuming else None,
        "attempts": previous.get("attempts", 0) + 1,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "inputs": {},
        **provenance.collect(),
    }


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _discard(partial: Path, created: list[Path], resuming: bool) -> None:
    """Remove what this invocation created; a resumed run's earlier work is kept."""
    if resuming:
        return
    shutil.rmtree(partial, ignore_errors=True)
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break


def _publish(partial: Path, final: Path) -> None:
    """Rename `.partial` into place; a forced replacement moves the old run aside only at this point."""
    if final.exists():
        trash = final.with_name(f".{final.name}.replaced-{int(time.time())}")
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash)
    else:
        os.replace(partial, final)


def read_run(run_dir: Path) -> tuple[RunSpec, dict]:
    """The spec and manifest of a finished run, for `reproduce`."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (needs manifest.json and config.yaml)")
    manifest = json.loads(manifest_path.read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    spec = RunSpec(cfg["experiment"], cfg["recipe"], cfg["params"], cfg.get("profile"), cfg.get("overrides", []))
    return spec, manifest


def compare_metrics(expected: dict, actual: dict, rtol: float, atol: float) -> list[tuple[str, object, object, bool]]:
    """Rows (metric, expected, actual, matches). Timing and memory figures are reported but never compared."""
    rows = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key), actual.get(key)
        volatile = any(word in key for word in ("time", "per_s", "tokens_s", "memory", "_mb", "duration"))
        if volatile:
            ok = True
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            ok = abs(a - b) <= atol + rtol * abs(a)
        else:
            ok = a == b
        rows.append((key, a, b, ok))
    return rows
