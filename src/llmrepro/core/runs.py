"""Runs: one directory per run, written atomically, with the resolved config, a manifest and the metrics.

Layout: `<output-root>/<experiment>/<run-id>/` holding `config.yaml`, `manifest.json`, `metrics.json`,
`run.log` and the recipe's artifacts. The run id is `<profile>-<config hash>`, so the same config maps to
the same directory: a finished run is never overwritten without `force`, and `resume` finds its
incomplete sibling again.

Work happens in `<run-id>.partial/`, renamed to `<run-id>/` only on success, under a run lock
(`core.lock`) so that no two processes share it. A run that fails or is interrupted stays `.partial` with
`"status": "failed"|"interrupted"|"oom"` in its manifest, so it never looks complete (an out-of-memory
failure becomes one line, `OutOfMemory`, exit code 3). Bad input (a `UserError`)
removes what this invocation created: nothing half-written remains.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from llmrepro.core import catalog, config, distributed, io, logs, provenance, registry, results, tracking
from llmrepro.core.catalog import RunSpec, recipe_config
from llmrepro.core.context import RunContext
from llmrepro.core.errors import UserError
from llmrepro.core.lock import RunLock

log = logging.getLogger("llmrepro")


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA), the CPU allocator's error, or Python's MemoryError."""
    return (type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError)
            or "DefaultCPUAllocator: can't allocate memory" in str(err))


def expects_oom(spec: RunSpec) -> bool:
    """An out-of-memory reproduction (`expect: oom`): a run that ends with status oom has its expected outcome."""
    return getattr(spec.cfg, "expect", None) == "oom"


class OutOfMemory(UserError):
    """A run that ran out of memory: its manifest says status oom, its directory (`run_dir`) is kept (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute(spec: RunSpec, output_dir: str | Path | None = None, *, run_id: str | None = None,
            resume: bool = False, force: bool = False, wait: bool = False) -> Path:
    """Run the recipe of `spec` in a `.partial` directory and publish it. Returns the final run directory."""
    record = registry.get(spec.recipe)
    recipe = record.load()
    root = io.output_root(output_dir)
    run_id = run_id or spec.default_run_id
    exp_dir = root / spec.experiment
    final, partial = exp_dir / run_id, exp_dir / f"{run_id}.partial"

    rank, group = distributed.setup()
    lock = RunLock(exp_dir, run_id) if rank == 0 else None
    resuming, created = distributed.on_rank0(group, lambda: _claim(record, lock, final, partial, resume, force, wait))
    ctx = RunContext(partial, spec.experiment, run_id, spec.profile, root, resuming, log=log)
    if rank > 0:
        return _follow(recipe, spec, ctx, final, group)

    manifest = ctx.manifest = _start_manifest(spec, run_id, partial, resuming)
    io.write_text(partial / "config.yaml", yaml.safe_dump(
        {"experiment": spec.experiment, "recipe": spec.recipe, "profile": spec.profile,
         "overrides": spec.overrides, "params": spec.params}, sort_keys=False))
    handler = logs.attach_run_log(partial / "run.log")
    started = time.perf_counter()
    try:
        io.write_json(partial / "manifest.json", manifest)
        log.info("run %s/%s (%s) in %s", spec.experiment, run_id, spec.recipe, partial)
        logs.adopt_library_loggers()
        _seed_everything(spec.cfg.seed)
        manifest["tracking"] = tracking.start(spec.cfg, spec, run_id, partial)
        ctx.tracking = manifest["tracking"] is not None
        metrics = recipe.run(spec.cfg, ctx)
        distributed.barrier(group)  # every rank has finished writing before the directory is renamed
        if spec.references:
            metrics = {**metrics, "reference": results.reference_block(spec.references, metrics)}
        io.write_json(partial / "metrics.json", metrics)
        manifest.update(status="complete", finished=_now(), duration_s=round(time.perf_counter() - started, 3),
                        metrics=metrics)
        io.write_json(partial / "manifest.json", manifest)
    except UserError:
        lock.release()
        _discard(partial, created, resuming)
        raise
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "oom" if is_out_of_memory(err) else "failed"
        manifest.update(status=status, error=f"{type(err).__name__}: {err}", finished=_now(),
                        duration_s=round(time.perf_counter() - started, 3))
        io.write_json(partial / "manifest.json", manifest)
        log.error("run %s: %s (kept at %s)", status, err, partial)
        lock.release()
        if status == "oom":
            raise OutOfMemory(f"out of memory: {str(err).strip().splitlines()[0][:300]} (run kept at {partial}, "
                              "status oom)", partial) from err
        raise
    finally:
        tracking.finish()
        logs.detach_run_log(handler)

    try:
        _publish(partial, final)
    finally:
        lock.release()
    log.info("run complete: %s", final)
    return final


def _claim(record: registry.Recipe, lock: RunLock, final: Path, partial: Path, resume: bool, force: bool,
           wait: bool) -> tuple[bool, list[Path]]:
    """Lock the run and make its `.partial` directory: (resuming, directories this invocation created)."""
    created = _make_dirs(final.parent)
    try:
        lock.acquire(wait)
        if final.exists() and not force:
            raise UserError(f"a finished run already exists at {final}; pass --force to replace it")
        resuming = False
        if partial.exists():
            if resume and not record.supports_resume:
                raise UserError(f"recipe '{record.name}' cannot resume; pass --force to start {partial} over")
            if resume:
                resuming = True
            elif force:
                shutil.rmtree(partial)
            else:
                raise UserError(f"an incomplete run exists at {partial}; pass --resume to continue it "
                                "or --force to start over")
        partial.mkdir(exist_ok=True)
    except UserError:
        lock.release()
        _remove_dirs(created)
        raise
    return resuming, created


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (innermost first); a file in the way is bad input."""
    created = [d for d in (path, *path.parents) if not d.exists()]
    for d in (path, *path.parents):
        if d.exists() and not d.is_dir():
            raise UserError(f"output directory {d} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_dirs([d for d in created if d.exists()])
        raise UserError(f"cannot create the output directory {path}: {err.strerror}") from None
    return created


def _remove_dirs(created: list[Path]) -> None:
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break


def _follow(recipe, spec: RunSpec, ctx: RunContext, final: Path, group) -> Path:
    """A rank other than 0: run the recipe in rank 0's `.partial` directory, then wait for everyone."""
    _seed_everything(spec.cfg.seed)
    recipe.run(spec.cfg, ctx)
    distributed.barrier(group)
    return final


def _start_manifest(spec: RunSpec, run_id: str, partial: Path, resuming: bool) -> dict:
    previous = {}
    if resuming and (partial / "manifest.json").exists():
        previous = io.read_json(partial / "manifest.json")
    return {
        "schema": 2,
        "experiment": spec.experiment,
        "recipe": spec.recipe,
        "profile": spec.profile,
        "overrides": spec.overrides,
        "run_id": run_id,
        "config_hash": spec.config_hash,
        "seeds": {"seed": spec.cfg.seed},
        "status": "running",
        "started": _now(),
        "resumed_from": previous.get("status") if resuming else None,
        "attempts": previous.get("attempts", 0) + 1,
        "world_size": distributed.world_size(),
        "inputs": {},
        "depends_on": [],
        **provenance.collect(),
    }


def _seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (all devices), as transformers' set_seed does, without importing
    transformers' trainer stack (peft, bitsandbytes: seconds per run) just for that."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _discard(partial: Path, created: list[Path], resuming: bool) -> None:
    """Remove what this invocation created; a resumed run's earlier work is kept."""
    if resuming:
        return
    shutil.rmtree(partial, ignore_errors=True)
    _remove_dirs(created)


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
    """The spec (validated again: it comes from disk) and manifest of a run directory, for `reproduce`."""
    manifest_path, config_path = run_dir / "manifest.json", run_dir / "config.yaml"
    if not manifest_path.is_file() or not config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (needs manifest.json and config.yaml)")
    manifest = io.read_json(manifest_path)
    saved = yaml.safe_load(config_path.read_text())
    cfg = config.validate(recipe_config(saved["recipe"]), saved["params"], str(config_path))
    try:
        references = list(catalog.load(saved["experiment"]).spec.reference)
    except UserError:  # an experiment since renamed or removed: reproduce what the directory says
        references = []
    spec = RunSpec(saved["experiment"], saved["recipe"], cfg, saved.get("profile"), saved.get("overrides", []),
                   references)
    return spec, manifest
