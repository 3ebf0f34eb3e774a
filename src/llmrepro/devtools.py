"""Developer tools: the golden metrics every smoke profile is pinned to, and the README's catalog table.

    python -m llmrepro.devtools golden                      # re-run every smoke profile, rewrite tests/golden/
    python -m llmrepro.devtools golden --only 'truth/*'     # just these experiments (and what they read)
    python -m llmrepro.devtools readme                      # rewrite README.md's table from `llmrepro list`

The tiny runs are deterministic, so each smoke profile's non-volatile metrics (not times, memory or
throughput, see `core.results.VOLATILE`) are pinned in `tests/golden/<experiment>.json`, which
`tests/test_golden.py` checks for the whole catalog. A deliberate change regenerates them with this command;
the diff of the golden files is then part of the change.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "golden"
README = ROOT / "README.md"
CATALOG_BEGIN, CATALOG_END = "<!-- catalog: begin (python -m llmrepro.devtools readme) -->", "<!-- catalog: end -->"
RTOL, ATOL = 1e-3, 1e-5  # CPUs differ in the last bits of float32 reductions; training steps amplify them a little


def pinned(metrics: dict) -> dict:
    """The metrics a golden file pins: everything but volatile figures and the reference block."""
    from llmrepro.core import results

    return {k: v for k, v in metrics.items() if k != "reference" and not results.is_volatile(k)}


def golden_path(experiment: str) -> Path:
    return GOLDEN_DIR / f"{experiment}.json"


def mismatches(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between a golden file's metrics and a run's (empty when they agree)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            out.append(f"{key}: missing (golden {expected[key]!r})")
        elif key not in expected:
            out.append(f"{key}: new metric {actual[key]!r} (not in the golden file)")
        elif not _close(expected[key], actual[key]):
            out.append(f"{key}: golden {expected[key]!r}, got {actual[key]!r}")
    return out


def _close(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return abs(a - b) <= ATOL + RTOL * abs(a)


class SmokeRuns:
    """Smoke runs under one output root, each made once, when first asked for, after the runs it reads."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.done = Path(output_dir), {}

    def get(self, name: str) -> Path:
        """The finished smoke run of `name` (its dependencies are run first); raises what the run raised."""
        from llmrepro.core import catalog, runs

        if name not in self.done:
            try:
                for dep in catalog.load(name).resolve("smoke").dependencies():
                    self.get(dep.experiment)
                spec = catalog.load(name).run_spec("smoke")
                self.done[name] = runs.execute(spec, self.output_dir)
            except runs.OutOfMemory as err:  # the OOM reproduction's outcome is its kept run (status oom)
                expected = runs.expects_oom(spec) and err.run_dir is not None
                self.done[name] = Path(err.run_dir) if expected else err
            except Exception as err:  # noqa: BLE001 -- kept, so that every experiment reading this run fails alike
                self.done[name] = err
        if isinstance(self.done[name], Exception):
            raise self.done[name]
        return self.done[name]


def run_smoke(names: list[str], output_dir: Path) -> dict[str, Path | Exception]:
    """Every named experiment's smoke run under `output_dir`, dependencies first: name -> run dir or error."""
    smoke = SmokeRuns(output_dir)
    for name in names:
        try:
            smoke.get(name)
        except Exception:  # noqa: BLE001 -- recorded in smoke.done
            pass
    return {name: smoke.done[name] for name in names}


def golden(only: list[str]) -> int:
    from llmrepro.core import catalog, io

    names = catalog.names()
    chosen = [n for n in names if not only or any(fnmatch.fnmatch(n, p) for p in only)]
    with tempfile.TemporaryDirectory(prefix="llmrepro-golden-") as tmp:
        ran = run_smoke(chosen, Path(tmp))
        failed = 0
        for name in chosen:
            result = ran[name]
            if isinstance(result, Exception):
                print(f"FAILED {name}: {type(result).__name__}: {result}", file=sys.stderr)
                failed += 1
                continue
            path = golden_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            metrics = pinned(io.read_json(result / "metrics.json"))
            old = io.read_json(path)["metrics"] if path.is_file() else None
            io.write_json(path, {"experiment": name, "profile": "smoke", "metrics": metrics})
            print(f"{'unchanged' if old == metrics else 'written'}: {path.relative_to(GOLDEN_DIR.parent.parent)}")
    stale = [p for p in GOLDEN_DIR.rglob("*.json") if str(p.relative_to(GOLDEN_DIR).with_suffix("")) not in names]
    for p in stale:
        p.unlink()
        print(f"removed (no such experiment): {p}")
    return 1 if failed else 0


def readme_with_table(text: str) -> str:
    """README.md's text with the catalog table between its two markers replaced by the current one."""
    begin, end = text.index(CATALOG_BEGIN) + len(CATALOG_BEGIN), text.index(CATALOG_END)
    from llmrepro.core import catalog

    return text[:begin] + "\n" + catalog.table("markdown") + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    from llmrepro.core import logs
    from llmrepro.core.progress import quiet_library_bars

    parser = argparse.ArgumentParser(prog="python -m llmrepro.devtools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("golden", help="re-run smoke profiles and rewrite their golden metrics")
    g.add_argument("--only", action="append", metavar="GLOB", help="only experiments matching (repeatable)")
    sub.add_parser("readme", help="rewrite README.md's experiment table from the catalog")
    args = parser.parse_args(argv)
    if args.command == "readme":
        README.write_text(readme_with_table(README.read_text()))
        print(f"wrote the catalog table into {README}")
        return 0
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LLMREPRO_PROGRESS": "0",
                       "WANDB_MODE": "disabled"}.items():  # as the tests run them
        os.environ.setdefault(key, value)
    os.environ.pop("WANDB_API_KEY", None)
    logs.setup()
    quiet_library_bars()
    return golden(args.only or [])


if __name__ == "__main__":
    sys.exit(main())
