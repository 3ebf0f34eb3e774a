"""mc-eval: multiple-choice scoring of a causal LM, base or with a peft adapter or an ITI intervention.

Scoring modes (`scoring`, names from `lm.mc.SCORERS`; several in one run share the loaded model):
- `thesis`: the DTU thesis' MCCLA (ITI notebooks @ a0bb04c): its few-shot block + "Q: ...\\nA: " + choice, summed
  choice log-prob, p_true = normalised mass of the true choices over the MC2 set; `thesis_correct` = p_true > 0.5.
- `honest_llama`: honest_llama's TruthfulQA MC1/MC2/MC3 (instruction prompt + QA primer, answers with periods).
- `numbered`: ReprPO's TruthfulQA MC1 score (numbered choices after its system prompt and one example; ratio of the
  correct number token's probability to the others', ratio/(1+ratio)).
- `completion`: summed (or mean) log-prob of each choice after the prompt (preference pairs: chosen beats rejected).

Metrics: `<mode>_<figure>` means over the questions with `_ci_low`/`_ci_high` bootstrap 95% intervals, `n_questions`,
`dirichlet_baseline` (the thesis' random baseline, mean |true|/|all|), and with `text` CE and KL of the modified
model against the unmodified one (honest_llama's `run_ce_loss`/`run_kl_wrt_orig`). `scores.jsonl`: per question.

An adapter comes from a run (`adapter`: a RunRef to a dpo/reprpo/instruct-sft run; the adapter directory is the
run directory or the subdirectory `adapter_name`, else the only subdirectory holding an adapter_config.json) or a
directory (`adapter_path`). An intervention comes from an `iti` run (its chosen heads, alpha and K; `iti_alpha`/
`iti_k` override them).

Deliberate differences from the sources: questions are scored in padded batches (the sources ran one sequence at
a time; only rounding differs); CE/KL texts are the first `text.limit` rows, not a shuffled draw.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef
from llmrepro.core.errors import UserError
from llmrepro.lm.mc import MCData, ScoringMode, ScoringOptions, TextData
from llmrepro.lm.models import ModelConfig

ADAPTER_RECIPES = ("dpo", "reprpo", "instruct-sft")  # the registry record's depends_on lists them too


class Config(RecipeConfig):
    model: ModelConfig
    data: MCData
    scoring: list[ScoringMode] = Field(["thesis"], min_length=1)
    options: ScoringOptions = ScoringOptions()
    adapter: RunRef | None = None  # a run that saved a peft adapter
    adapter_name: str | None = None  # its subdirectory holding adapter_config.json (default: found)
    adapter_path: str | None = None  # or an adapter directory
    intervention: RunRef | None = None  # an iti run
    iti_alpha: float | None = None  # override the iti run's chosen alpha
    iti_k: int | None = Field(None, ge=0)  # override its chosen number of heads
    text: TextData | None = None  # plain text for CE and KL against the unmodified model
    bootstrap: int = Field(2000, ge=0)  # resamples for the CIs (0: none)

    @model_validator(mode="after")
    def _one_modification(self):
        if self.adapter is not None and self.adapter_path is not None:
            raise ValueError("give adapter (a run) or adapter_path (a directory), not both")
        if self.intervention is None and (self.iti_alpha is not None or self.iti_k is not None):
            raise ValueError("iti_alpha/iti_k need an intervention (an iti run)")
        return self


def find_adapter(run_dir: Path, name: str | None) -> Path:
    if name is not None:
        path = run_dir / name
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"{path}: no adapter_config.json (adapter_name names the adapter's subdirectory)")
        return path
    if (run_dir / "adapter_config.json").is_file():
        return run_dir
    found = sorted(p.parent for p in run_dir.glob("*/adapter_config.json"))
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise UserError(f"{run_dir}: cannot tell which adapter to use (subdirectories with adapter_config.json: "
                        f"{what}); set adapter_name")
    return found[0]


def load_intervention(path: Path, cfg: Config, model_name: str):
    from llmrepro.representations.iti import Intervention

    chosen = io.read_json(path / "chosen.json")
    if chosen["model"] != model_name:
        raise UserError(f"intervention from {path} was fit on model {chosen['model']}, not {model_name}")
    full = Intervention.load(path / "intervention.npz")
    k = chosen["K"] if cfg.iti_k is None else cfg.iti_k
    if k > len(full.heads):
        raise UserError(f"iti_k={k}, but the iti run ranked only {len(full.heads)} heads")
    return full.top(k, chosen["alpha"] if cfg.iti_alpha is None else cfg.iti_alpha)


def run(cfg: Config, ctx) -> dict:
    import numpy as np

    from llmrepro.lm import mc
    from llmrepro.lm.models import load_model, load_tokenizer
    from llmrepro.representations.iti import intervene

    items = mc.load_items(cfg.data, ctx)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, ctx=ctx).eval()
    original = contextlib.nullcontext
    if cfg.adapter is not None or cfg.adapter_path is not None:
        from peft import PeftModel

        if cfg.adapter is not None:
            dep = ctx.require(cfg.adapter, tuple(ADAPTER_RECIPES))
            path = find_adapter(dep.path, cfg.adapter_name)
        else:
            path = Path(cfg.adapter_path).expanduser()
            if not (path / "adapter_config.json").is_file():
                raise UserError(f"adapter_path {cfg.adapter_path}: no adapter_config.json there")
        model = PeftModel.from_pretrained(model, str(path)).eval()
        ctx.record_input("adapters", str(path), sha256=io.sha256_file(path / "adapter_config.json"))
        original = model.disable_adapter
    iti = None
    if cfg.intervention is not None:
        dep = ctx.require(cfg.intervention, "iti")
        iti = load_intervention(dep.path, cfg, cfg.model.name)

    metrics: dict = {"n_questions": len(items), "dirichlet_baseline": mc.dirichlet_baseline(items)}
    if iti is not None:
        metrics.update(iti_k=len(iti.heads), iti_alpha=iti.alpha)
    per_question = [{"question": it.question, "group": it.group} for it in items]
    with intervene(model, iti):
        for mode in cfg.scoring:
            rows = mc.SCORERS[mode](model, tok, items, cfg.options, lambda xs, m=mode: ctx.progress(xs, desc=m))
            metrics.update(mc.summarize(mode, rows, cfg.bootstrap, cfg.seed))
            for out, r in zip(per_question, rows, strict=True):
                out[mode] = r
    if cfg.text is not None:
        texts = mc.read_texts(cfg.text, ctx)
        ids = [tok(t)["input_ids"][: cfg.text.max_tokens] for t in texts]
        ids = [x for x in ids if len(x) >= 2]
        metrics.update(mc.ce_and_kl(model, ids, modified=lambda: intervene(model, iti), original=original))
    with open(ctx.dir / "scores.jsonl", "w") as f:
        for row in per_question:
            f.write(json.dumps(row, default=float) + "\n")
    io.write_text(ctx.dir / "report.md", report(cfg, metrics))
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in metrics.items()}


def report(cfg: Config, metrics: dict) -> str:
    from llmrepro.lm.mc import FIGURES

    rows = []
    for mode in cfg.scoring:
        for fig in FIGURES[mode]:
            key = f"{mode}_{fig}"
            lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            rows.append([mode, fig, metrics[key], f"[{lo:.4f}, {hi:.4f}]" if lo is not None else ""])
    lines = [f"# mc-eval: {cfg.model.name} on {cfg.data.name}", "",
             f"{metrics['n_questions']} questions; random (Dirichlet) baseline {metrics['dirichlet_baseline']:.4f}"
             + (f"; ITI K={metrics['iti_k']}, alpha={metrics['iti_alpha']}" if "iti_k" in metrics else "")
             + ("; adapter" if cfg.adapter or cfg.adapter_path else ""), "",
             io.table(rows, ["mode", "figure", "mean", "95% CI (bootstrap)"], "markdown")]
    if "ce" in metrics:
        lines += ["", f"CE {metrics['ce']:.4f}, KL vs unmodified {metrics['kl']:.4f} on {cfg.text.name}"]
    return "\n".join(lines) + "\n"
