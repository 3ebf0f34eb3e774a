"""memory-report: one comparison of finished memory-efficiency runs, as a markdown table and a bar plot of
peak memory and time per variant (`report.md`, `report.png`), each measured figure next to the one the
source published when its experiment carries one (defence slide 9's allocated/reserved GiB, the timing
notebook's seconds per trial).

It reads the run of each listed experiment with `profile` under the same output root as this run (the run
its current config gives, `<root>/<experiment>/<profile>-<config hash>/`); experiments without a finished run
are listed as missing, so the report can be written at any point and rerun with `--force` as runs complete.

Deliberate differences from the source: none to list; the source had no report step (its memory figures
were the titles of its memory-timeline plots, its times the notebook's printout).
"""

from __future__ import annotations

from pathlib import Path

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef

# (metric, column label, whether a "published" column follows it)
COLUMNS = [("peak_memory_mb", "peak memory (MB)", False),
           ("max_memory_allocated_gib", "max allocated (GiB)", True),
           ("max_memory_reserved_gib", "max reserved (GiB)", True),
           ("timeline_peak_total_mb", "live tensors, profiled steps (MB)", False),
           ("step_time_s", "step time (s)", False),
           ("trial_time_s", "time per trial (s)", True)]


class Config(RecipeConfig):
    experiments: list[str]  # memory-efficiency experiments to compare, e.g. memory_efficiency/opt-125m-fused-adam
    profile: str | None = None  # whose runs: "smoke" for the smoke runs, None for the full ones

    def dependencies(self) -> list[RunRef]:
        return [RunRef(experiment=exp, profile=self.profile) for exp in self.experiments]


def collect(ctx, cfg: Config) -> tuple[list[dict], list[str]]:
    """(one row per found run: experiment, method, optimizer, device, metrics..., missing experiment names)."""
    rows, missing = [], []
    for ref in cfg.dependencies():
        dep = ctx.find(ref, "memory-efficiency")
        if dep is None:
            missing.append(ref.experiment)
            continue
        model, train = dep.params["model"], dep.params["train"]
        variant = f"{train['method']} + {train['optimizer']}" + (" + LoRA" if model.get("lora") else "") + (
            f" + {model['quantization']}" if model.get("quantization") else "")
        if train.get("fused_buckets", "parameter") != "parameter":
            variant += f" (per {train['fused_buckets']})"
        variant += f", batch {train.get('batch_size', 1)}" + (", time test" if dep.params.get("time_test") else "")
        rows.append({"experiment": ref.experiment, "model": model["name"], "variant": variant, "run": str(dep.path),
                     **io.read_json(dep.path / "metrics.json")})
    return rows, missing


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}"


def markdown(rows: list[dict], missing: list[str], profile: str | None) -> str:
    head = ["experiment", "model", "variant"]
    for _, label, published in COLUMNS:
        head += [label, "published"] if published else [label]
    lines = [f"# Memory efficiency: {profile or 'full'} runs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["experiment"], r["model"], r["variant"]]
        for key, _, published in COLUMNS:
            cells.append(_cell(r.get(key)))
            if published:
                cells.append(_cell((r.get("reference") or {}).get(key, {}).get("published")))
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
    bars = [("peak_memory_mb", "peak memory (MB)"), ("time", "step time or time per trial (s)")]
    for ax, (key, label) in zip(axes, bars, strict=True):
        values = [(r.get("step_time_s") or r.get("trial_time_s") or 0) if key == "time" else (r.get(key) or 0)
                  for r in rows]
        ax.barh(labels, values)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Config, ctx) -> dict:
    rows, missing = collect(ctx, cfg)
    (ctx.dir / "report.md").write_text(markdown(rows, missing, cfg.profile))
    if rows:
        plot(rows, ctx.dir / "report.png")
    for r in rows:
        ctx.log.info("%s: %s", r["experiment"], r["run"])
    return {"runs_found": len(rows), "runs_missing": len(missing)}
