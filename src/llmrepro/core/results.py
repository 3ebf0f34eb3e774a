"""Results side by side: a run's metrics against the figures its source published, several runs in one table
(`llmrepro compare`), and a re-run against the original (`llmrepro reproduce`).

    llmrepro compare outputs/reprpo/*/default-* --metric tqa_score --format markdown

A run's `metrics.json` carries, when its experiment has a `reference:` block, a `reference` entry:
`{metric: {measured, published, diff, tolerance, match, where}}`. Timing and memory figures
(`VOLATILE` words in their names) are shown but never counted as a mismatch.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

from llmrepro.core import io
from llmrepro.core.errors import UserError

VOLATILE = ("time", "per_s", "tokens_s", "memory", "_mb", "duration", "seconds")
FORMATS = ("text", "markdown", "csv", "json")


def is_volatile(metric: str) -> bool:
    return any(word in metric for word in VOLATILE)


def reference_block(references, metrics: dict) -> dict:
    """{metric: {measured, published, diff, tolerance, match, where}} for each published figure."""
    out = {}
    for ref in references:
        measured = metrics.get(ref.metric)
        number = isinstance(measured, (int, float)) and not isinstance(measured, bool) and math.isfinite(measured)
        diff = measured - ref.value if number else None
        out[ref.metric] = {"measured": measured, "published": ref.value, "diff": diff, "tolerance": ref.tolerance,
                           "match": None if diff is None or ref.tolerance is None else abs(diff) <= ref.tolerance,
                           "where": ref.where}
    return out


def reference_rows(block: dict) -> list[list]:
    return [[m, r["measured"], r["published"], r["diff"], _match(r), r["where"]] for m, r in block.items()]


REFERENCE_HEADER = ["metric", "measured", "published", "diff", "match", "published in"]


def reference_table(block: dict, fmt: str = "markdown") -> str:
    """The measured-vs-published table of a run's `reference` block, for its report."""
    return io.table(reference_rows(block), REFERENCE_HEADER, fmt)


def _match(r: dict) -> str:
    return "" if r["match"] is None else ("yes" if r["match"] else "NO")


# ------------------------------------------------------------------------------------------------ compare


def run_dir_of(path: str | Path) -> Path:
    p = Path(path)
    p = p.parent if p.name in ("manifest.json", "metrics.json") else p
    if not (p / "manifest.json").is_file() or not (p / "metrics.json").is_file():
        raise UserError(f"{path}: not a finished run (needs manifest.json and metrics.json)")
    return p


def compare(paths: list[str], metrics: list[str] = (), references_only: bool = False) -> tuple[list[list], list[str]]:
    """(rows, header): one row per run and metric, with the published figure and the difference when known.

    `metrics` are glob patterns of metric names; a metric with `<name>_ci_low`/`<name>_ci_high` siblings shows
    them as its confidence interval instead of as rows of their own."""
    if not paths:
        raise UserError("compare: give one or more run directories or manifests")
    rows = []
    for path in paths:
        run = run_dir_of(path)
        manifest, values = io.read_json(run / "manifest.json"), io.read_json(run / "metrics.json")
        refs = values.pop("reference", {}) or {}
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}
        cis = {k for k in scalars if k.endswith(("_ci_low", "_ci_high"))
               and k.rsplit("_ci_", 1)[0] in scalars}
        for name, value in scalars.items():
            if name in cis or (metrics and not any(fnmatch.fnmatch(name, pat) for pat in metrics)):
                continue
            if references_only and name not in refs:
                continue
            ref = refs.get(name, {})
            low, high = scalars.get(f"{name}_ci_low"), scalars.get(f"{name}_ci_high")
            ci = f"[{io._cell(low)}, {io._cell(high)}]" if low is not None and high is not None else None
            rows.append([manifest.get("experiment"), manifest.get("run_id"), manifest.get("profile") or "default",
                         name, value, ci, ref.get("published"), ref.get("diff"), ref.get("where")])
    if not rows:
        raise UserError("compare: no metric matches " + (", ".join(metrics) if metrics else "(the runs have none)"))
    header = ["experiment", "run", "profile", "metric", "measured", "95% CI", "published", "diff", "published in"]
    if all(r[5] is None for r in rows):  # no interval anywhere: leave the column out
        header.pop(5)
        rows = [r[:5] + r[6:] for r in rows]
    return rows, header


def compare_metrics(expected: dict, actual: dict, rtol: float, atol: float) -> list[tuple[str, object, object, bool]]:
    """Rows (metric, expected, actual, matches) of a re-run against the original; volatile figures always match."""
    rows = []
    for key in sorted((set(expected) | set(actual)) - {"reference"}):
        a, b = expected.get(key), actual.get(key)
        if is_volatile(key):
            ok = True
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            ok = abs(a - b) <= atol + rtol * abs(a)
        else:
            ok = a == b
        rows.append((key, a, b, ok))
    return rows
