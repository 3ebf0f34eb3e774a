"""memory-report: one comparison of finished memory-efficiency runs, as a markdown table and a bar plot of
peak memory and step time per variant (`report.md`, `report.png`).

It reads the newest finished run of each listed experiment and profile from the same output root as this
run (`<root>/<experiment>/<profile>-<hash>/metrics.json`); experiments without a finished run are listed as
missing, so the report can be written at any point and rerun with `--force` as runs complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llmrepro.recipes.base import RecipeConfig

NAME = "memory-report"
DESCRIPTION = "Markdown table and bar plot of peak memory and step time across memory-efficiency runs"
SUPPORTS_RESUME = False
COLUMNS = [("peak_memory_mb", "peak memory (MB)"), ("peak_above_model_mb", "above model (MB)"),
           ("timeline_peak_total_mb", "live tensors, first steps (MB)"), ("step_time_s", "step time (s)")]


class Config(RecipeConfig):
    experiments: list[str]  # memory-efficiency experiments to compare, e.g. memory_efficiency/opt-125m-fused-adam
    profile: str | None = None  # whose runs: "smoke" for the smoke runs, None for the full ones


def latest_run(root: Path, experiment: str, profile: str | None) -> Path | None:
    """The newest finished run directory of `experiment` with `profile`, or None."""
    runs = [d for d in (root / experiment).glob(f"{profile or 'default'}-*")
            if not d.name.endswith(".partial") and (d / "metrics.json").is_file()]
    return max(runs, key=lambda d: (d / "metrics.json").stat().st_mtime, default=None)


def collect(root: Path, cfg: Config) -> tuple[list[dict], list[str]]:
    """(one row per found run: experiment, method, optimizer, device, metrics..., missing experiment names)."""
    rows, missing = [], []
    for exp in cfg.experiments:
        run_dir = latest_run(root, exp, cfg.profile)
        if run_dir is None:
            missing.append(exp)
            continue
        params = yaml.safe_load((run_dir / "config.yaml").read_text())["params"]
        model, train = params["model"], params["train"]
        variant = f"{train['method']} + {train['optimizer']}" + (" + LoRA" if model.get("lora") else "") + (
            f" + {model['quantization']}" if model.get("quantization") else "")
        rows.append({"experiment": exp, "model": model["name"], "variant": variant, "run": str(run_dir),
                     **json.loads((run_dir / "metrics.json").read_text())})
    return rows, missing


def markdown(rows: list[dict], missing: list[str], profile: str | None) -> str:
    head = ["experiment", "model", "variant", *(label for _, label in COLUMNS)]
    lines = [f"# Memory efficiency: {profile or 'full'} runs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["experiment"], r["model"], r["variant"],
                 *("" if r.get(key) is None else f"{r[key]:.4g}" for key, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["experiment"].split("/")[-1] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2))
    for ax, (key, label) in zip(axes, [COLUMNS[0], COLUMNS[-1]], strict=True):
        ax.barh(labels, [r[key] for r in rows])
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Config, ctx) -> dict:
    # ctx.dir is <root>/<family>/<name>/<run-id>.partial: the root is one level up per experiment-name part.
    root = ctx.dir.parents[len(ctx.manifest["experiment"].split("/"))]
    rows, missing = collect(root, cfg)
    (ctx.dir / "report.md").write_text(markdown(rows, missing, cfg.profile))
    if rows:
        plot(rows, ctx.dir / "report.png")
    for r in rows:
        ctx.log.info("%s: %s", r["experiment"], r["run"])
    return {"runs_found": len(rows), "runs_missing": len(missing)}
