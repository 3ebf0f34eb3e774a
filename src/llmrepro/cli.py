"""`llmrepro`: list, show, validate, run, smoke, reproduce and compare the experiments of the catalog.

    llmrepro list
    llmrepro show instruct/dolly-pythia-2.8b --profile smoke
    llmrepro run instruct/dolly-pythia-2.8b --profile smoke train.max_steps=20
    llmrepro smoke
    llmrepro reproduce outputs/instruct/dolly-pythia-2.8b/smoke-1a2b3c4d5e/manifest.json
    llmrepro compare outputs/similarity/*/smoke-* --metric accuracy --format markdown
    llmrepro plan instruct/dolly-pythia-12b --gpus 4 --gpu-mem 80

Bad input prints one line on stderr and exits 2. Only the standard library is imported before logging is
set up, so that no third-party import can print before it; torch and the recipes load when a run starts.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

from llmrepro import __version__


def cmd_list(args) -> int:
    from llmrepro.core import catalog

    print(catalog.table(args.format))
    return 0


def cmd_recipes(args) -> int:
    from llmrepro.core import io, registry

    rows = [[r.name, "yes" if r.supports_resume else "", "yes" if r.supports_distributed else "",
             ", ".join(r.depends_on), r.description] for r in registry.RECIPES]
    print(io.table(rows, ["recipe", "resume", "torchrun", "reads runs of", "description"]))
    return 0


def cmd_show(args) -> int:
    import yaml

    from llmrepro.core import catalog

    exp = catalog.load(args.experiment)
    spec = exp.run_spec(args.profile, args.overrides)
    src = exp.source
    print(yaml.safe_dump({"experiment": exp.name, "recipe": spec.recipe, "profile": args.profile,
                          "source": f"{src.repository}@{src.commit}", "run_id": spec.default_run_id,
                          "params": spec.params,
                          "reference": [r.model_dump(exclude_none=True) for r in spec.references]},
                         sort_keys=False), end="")
    return 0


def cmd_validate(args) -> int:
    from llmrepro.core import catalog
    from llmrepro.core.errors import UserError

    errors, count, names = [], 0, catalog.names()
    for name in names:
        try:
            exp = catalog.load(name)
            for profile in [None, *exp.spec.profiles]:
                exp.resolve(profile)
                count += 1
            if "smoke" not in exp.spec.profiles:
                errors.append(f"{name}: no smoke profile")
        except UserError as err:
            errors.append(str(err))
    for err in errors:
        print(f"invalid: {err}", file=sys.stderr)
    if errors:
        raise UserError(f"{len(errors)} experiment file(s) invalid")
    print(f"ok: {len(names)} experiments, {count} configurations valid")
    return 0


def cmd_run(args) -> int:
    from llmrepro.core import catalog, distributed, io, results, runs

    spec = catalog.load(args.experiment).run_spec(args.profile, args.overrides)
    final = runs.execute(spec, args.output_dir, run_id=args.run_id, resume=args.resume, force=args.force,
                         wait=args.wait)
    if distributed.rank() > 0:
        return 0  # rank 0 publishes the run (after every rank is done) and reports it
    reference = io.read_json(final / "metrics.json").get("reference")
    if reference:
        print(results.reference_table(reference, "text"), file=sys.stderr)
    print(final)
    return 0


def cmd_smoke(args) -> int:
    """Every experiment's smoke profile in turn, dependencies first; a finished identical run is reused."""
    import logging

    from llmrepro.core import catalog, io, runs
    from llmrepro.core.errors import UserError

    names = [n for n in catalog.names() if not args.only or any(fnmatch.fnmatch(n, p) for p in args.only)]
    if not names:
        raise UserError(f"no experiment matches {args.only}")
    rows, failed = [], 0
    for name in catalog.dependency_order(names, "smoke"):
        spec = catalog.load(name).run_spec("smoke", args.overrides)
        final = io.output_root(args.output_dir) / name / spec.default_run_id
        start = time.perf_counter()
        expect_oom = runs.expects_oom(spec)
        try:
            if (final / "metrics.json").is_file() and not args.force:
                status = "reused"
            else:
                final = runs.execute(spec, args.output_dir, force=args.force or expect_oom)
                status = "ok"
            if expect_oom:
                raise UserError("expected an out-of-memory failure (expect: oom), but the run completed")
            metrics = io.read_json(final / "metrics.json")
            metrics.pop("reference", None)
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:3])
        except runs.OutOfMemory as err:
            status, shown = ("oom (expected)", "") if expect_oom else ("FAILED", str(err)[:100])
            failed += not expect_oom
        except Exception as err:  # one broken experiment must not hide the others' results
            status, shown, failed = "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:100]}", failed + 1
            logging.getLogger("llmrepro").debug("smoke %s failed", name, exc_info=True)
        rows.append([name, status, f"{time.perf_counter() - start:.1f}", shown])
    print(io.table(rows, ["experiment", "status", "seconds", "metrics"]))
    print(f"smoke: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_reproduce(args) -> int:
    from llmrepro.core import io, results, runs
    from llmrepro.core.errors import UserError

    path = Path(args.manifest)
    run_dir = path.parent if path.name == "manifest.json" else path
    spec, manifest = runs.read_run(run_dir)
    if manifest.get("status") != "complete":
        raise UserError(f"{run_dir}: run is not complete (status {manifest.get('status')}); nothing to compare")
    final = runs.execute(spec, args.output_dir, run_id=f"{manifest['run_id']}-repro", force=args.force)
    actual = io.read_json(final / "metrics.json")
    rows = results.compare_metrics(manifest["metrics"], actual, args.rtol, args.atol)
    print(io.table([[k, a, b, "ok" if ok else "DIFFERS"] for k, a, b, ok in rows],
                   ["metric", "original", "reproduced", "match"]))
    differs = sum(not ok for *_, ok in rows)
    from llmrepro.core import provenance

    print(provenance.compare_stacks(manifest.get("stack"), io.read_json(final / "manifest.json").get("stack")))
    print(f"reproduce: {len(rows) - differs} passed, {differs} failed ({final})")
    return 1 if differs else 0


def cmd_compare(args) -> int:
    from llmrepro.core import io, results

    rows, header = results.compare(args.runs, args.metric or (), args.references_only)
    print(io.table(rows, header, args.format))
    return 0


def cmd_plan(args) -> int:
    """Peak memory per device, offline: breakdown, verdict, and the smallest change that fits (exit 1 if OOM)."""
    from llmrepro.training.planning import api

    plan = api.plan(args.experiment, args.profile, args.overrides, gpus=args.gpus, gpu_mem_gib=args.gpu_mem)
    print(api.render(plan))
    return 0 if plan.fits else 1


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmrepro", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"llmrepro {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show every log record on the console too")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="experiments: source project, recipe, description")
    ls.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    ls.set_defaults(fn=cmd_list)
    sub.add_parser("recipes", help="recipes: what each does and which runs it reads").set_defaults(fn=cmd_recipes)
    s = sub.add_parser("show", help="the fully resolved config of an experiment")
    s.add_argument("experiment")
    s.add_argument("--profile")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(fn=cmd_show)
    sub.add_parser("validate", help="check that every experiment YAML parses and validates").set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="run one experiment")
    r.add_argument("experiment")
    r.add_argument("--profile")
    r.add_argument("--output-dir", help="output root (default $LLMREPRO_OUTPUT_DIR or ./outputs)")
    r.add_argument("--run-id", help="run directory name (default <profile>-<config hash>)")
    r.add_argument("--resume", action="store_true", help="continue an incomplete run of the same config")
    r.add_argument("--force", action="store_true", help="replace a finished run / restart an incomplete one")
    r.add_argument("--wait", action="store_true", help="if another process is running this run, wait for it")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.set_defaults(fn=cmd_run)

    m = sub.add_parser("smoke", help="run every experiment's smoke profile (dependencies first), then a summary")
    m.add_argument("--output-dir")
    m.add_argument("--only", action="append", metavar="GLOB", help="only experiments matching (repeatable)")
    m.add_argument("--force", action="store_true", help="re-run smoke runs that already finished")
    m.add_argument("overrides", nargs="*", metavar="key=value")
    m.set_defaults(fn=cmd_smoke)

    d = sub.add_parser("reproduce", help="re-run a finished run from its manifest and compare metrics")
    d.add_argument("manifest", help="manifest.json of a finished run (or its directory)")
    d.add_argument("--output-dir")
    d.add_argument("--force", action="store_true")
    d.add_argument("--rtol", type=float, default=1e-5)
    d.add_argument("--atol", type=float, default=1e-8)
    d.set_defaults(fn=cmd_reproduce)

    c = sub.add_parser("compare", help="one table of several runs' metrics next to the published figures")
    c.add_argument("runs", nargs="+", metavar="RUN_OR_MANIFEST")
    c.add_argument("--metric", action="append", metavar="GLOB", help="only these metrics (repeatable)")
    c.add_argument("--references-only", action="store_true", help="only metrics with a published figure")
    c.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    c.set_defaults(fn=cmd_compare)

    pl = sub.add_parser("plan", help="peak memory per device, offline: breakdown, verdict, smallest change that fits")
    pl.add_argument("experiment")
    pl.add_argument("--profile")
    pl.add_argument("--gpus", type=int, help="devices (default: the experiment's resources; 0: this CPU)")
    pl.add_argument("--gpu-mem", type=float, metavar="GB", help="memory per GPU in GiB (default 80)")
    pl.add_argument("overrides", nargs="*", metavar="key=value")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    from llmrepro.core import logs

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`run EXP --profile smoke a.b=1`), which argparse cannot interleave
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logs.setup(args.verbose)  # before any third-party import: their import-time records go to run logs
    from llmrepro.core.errors import UserError
    from llmrepro.core.progress import quiet_library_bars

    try:
        quiet_library_bars()
        return args.fn(args)
    except UserError as err:
        print(f"llmrepro: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("llmrepro: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmrepro list | head`: the reader left; say nothing more
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
