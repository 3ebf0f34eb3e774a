"""`llmrepro`: list, show, validate, run, smoke and reproduce the experiments of the catalog.

    llmrepro list
    llmrepro show instruct/dolly-pythia-2.8b --profile smoke
    llmrepro run instruct/dolly-pythia-2.8b --profile smoke train.max_steps=20
    llmrepro smoke
    llmrepro reproduce outputs/instruct/dolly-pythia-2.8b/smoke-1a2b3c4d5e/manifest.json

Bad input prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from llmrepro import __version__, catalog, runs
from llmrepro.errors import UserError
from llmrepro.progress import enabled as progress_enabled


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(args) -> int:
    rows = [[e.name, e.spec.source, e.spec.recipe, e.spec.measures] for e in catalog.load_all()]
    print(_table(rows, ["experiment", "source", "recipe", "measures"]))
    return 0


def cmd_show(args) -> int:
    exp = catalog.load(args.experiment)
    cfg = exp.resolve(args.profile, args.overrides)
    print(yaml.safe_dump({"experiment": exp.name, "recipe": exp.spec.recipe, "profile": args.profile,
                          "params": cfg.model_dump(mode="json")}, sort_keys=False), end="")
    return 0


def cmd_validate(args) -> int:
    errors, count = [], 0
    for name in catalog.names():
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
    print(f"ok: {len(catalog.names())} experiments, {count} configurations valid")
    return 0


def _spec(exp: catalog.Experiment, profile: str | None, overrides: list[str]) -> runs.RunSpec:
    cfg = exp.resolve(profile, overrides)
    return runs.RunSpec(exp.name, exp.spec.recipe, cfg.model_dump(mode="json"), profile, list(overrides))


def cmd_run(args) -> int:
    exp = catalog.load(args.experiment)
    final = runs.execute(_spec(exp, args.profile, args.overrides), args.output_dir, run_id=args.run_id,
                         resume=args.resume, force=args.force)
    print(final)
    return 0


def cmd_smoke(args) -> int:
    """Every experiment's smoke profile in turn; a finished identical run is reused unless --force."""
    names = [n for n in catalog.names() if not args.only or any(fnmatch.fnmatch(n, p) for p in args.only)]
    if not names:
        raise UserError(f"no experiment matches {args.only}")
    rows, failed = [], 0
    for name in names:
        exp = catalog.load(name)
        spec = _spec(exp, "smoke", args.overrides)
        final = runs.output_root(args.output_dir) / name / spec.default_run_id
        start = time.perf_counter()
        try:
            if (final / "metrics.json").is_file() and not args.force:
                status = "reused"
            else:
                final = runs.execute(spec, args.output_dir, force=args.force)
                status = "ok"
            metrics = json.loads((final / "metrics.json").read_text())
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:3])
        except Exception as err:  # one broken experiment must not hide the others' results
            status, shown, failed = "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:100]}", failed + 1
            logging.getLogger("llmrepro").exception("smoke %s failed", name)
        rows.append([name, status, f"{time.perf_counter() - start:.1f}", shown])
    print(_table(rows, ["experiment", "status", "seconds", "metrics"]))
    print(f"smoke: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_reproduce(args) -> int:
    path = Path(args.manifest)
    run_dir = path.parent if path.name == "manifest.json" else path
    spec, manifest = runs.read_run(run_dir)
    if manifest.get("status") != "complete":
        raise UserError(f"{run_dir}: run is not complete (status {manifest.get('status')}); nothing to compare")
    final = runs.execute(spec, args.output_dir, run_id=f"{manifest['run_id']}-repro", force=args.force)
    actual = json.loads((final / "metrics.json").read_text())
    rows = runs.compare_metrics(manifest["metrics"], actual, args.rtol, args.atol)
    print(_table([[k, a, b, "ok" if ok else "DIFFERS"] for k, a, b, ok in rows],
                 ["metric", "original", "reproduced", "match"]))
    differs = sum(not ok for *_, ok in rows)
    print(f"reproduce: {len(rows) - differs} passed, {differs} failed ({final})")
    return 1 if differs else 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmrepro", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"llmrepro {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show the run log on the console too")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="experiments: source project, recipe, what it measures").set_defaults(fn=cmd_list)
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
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.set_defaults(fn=cmd_run)

    m = sub.add_parser("smoke", help="run every experiment's smoke profile, then print a summary")
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
    return p


def _setup_logging(verbose: bool) -> None:
    """Warnings on the console (so bad input stays one line), everything from INFO up in each run's run.log."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("llmrepro").setLevel(logging.INFO)
    if not progress_enabled():
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`run EXP --profile smoke a.b=1`), which argparse cannot interleave
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _setup_logging(args.verbose)
        return args.fn(args)
    except UserError as err:
        print(f"llmrepro: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("llmrepro: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
