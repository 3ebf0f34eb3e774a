"""iti: inference-time intervention on TruthfulQA as the DTU thesis ran it, with honest_llama's metrics on top.

Reproduces `notebooks/ITI_runs/*_out*.ipynb` @ a0bb04c (cells 26-38, 75), on a cache-activations run of the
TruthfulQA MC statements ("Q: {q}\\nA: {choice}" over the mc2 choices):
1. three partitions: the test folds of StratifiedGroupKFold(3, shuffled) on label x category, grouped by question;
2. partition 1: every head ranked by the 5-fold CV accuracy of the thesis' mass-mean probe (`GridSearchCV(cv=5)`:
   ungrouped, unshuffled StratifiedKFold, as the source; `ranking_cv.kind: grouped` fixes that), then one
   mass-mean direction and sigma (np.std of the projections) per head fit on all of partition 1;
3. partition 2: grid over alpha x K (alpha outer, K inner, the first maximum of mean p_true wins; the thesis' grid
   alpha {1, 2, 4, 8, 16} x K = int(L*H*{2, 4, 6, 8, 10}%));
4. partition 3 and the OOD sets (each with its own few-shot block): the chosen intervention and the base model
   (K=0), mean p_true (MCCLA, the MC2 formula) with bootstrap CIs and the paired ITI - base difference.
The shift alpha * sigma * direction goes into the chosen heads' slices of o_proj's input at every position
(`representations.iti`).

Beyond the thesis (options): MC1 from the same scores (the best true answer beats every false one; recorded in
the grid too), honest_llama's MC1/MC2 prompt on partition 3 (`honest_llama: true`), CE and KL against the
unmodified model on plain text (`text`), a fixed point instead of the grid (`fixed`, e.g. honest_llama's K=48,
alpha=15), grouped head-ranking CV, and a random (Dirichlet) baseline in closed form.

Deliberate differences from the source: every split is seeded (the source's were not, so partitions differed
between runs and models); the grid is evaluated on batched forward passes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.lm.mc import ScoringOptions, TextData
from llmrepro.representations.datasets import TruthData
from llmrepro.representations.probes import CVKind

THESIS_ALPHAS = [1.0, 2.0, 4.0, 8.0, 16.0]
THESIS_K_FRACTIONS = [0.02, 0.04, 0.06, 0.08, 0.10]  # np.linspace(0.2, 1.0, 5) * 0.1


class RankingCV(Strict):
    kind: CVKind = "ungrouped"  # the thesis' GridSearchCV(cv=5)
    n_splits: int = Field(5, ge=2)


class Grid(Strict):
    alphas: list[float] = Field(THESIS_ALPHAS, min_length=1)
    k_fractions: list[float] = THESIS_K_FRACTIONS  # K = int(layers * heads * fraction), truncated as the source
    k: list[int] | None = None  # explicit K values instead of fractions


class Fixed(Strict):
    alpha: float
    k: int = Field(ge=0)


class Config(RecipeConfig):
    activations: RunRef  # a cache-activations run holding the TruthfulQA MC statements
    dataset: str = "truthfulqa_mc"  # its name in that run
    partitions: int = Field(3, ge=3)
    ranking_cv: RankingCV = RankingCV()
    grid: Grid = Grid()
    fixed: Fixed | None = None  # skip the grid: this (alpha, K)
    select_on: Literal["p_true", "mc1"] = "p_true"
    ood: list[TruthData] = []  # other MC sets (form mc), evaluated whole with ITI and base
    honest_llama: bool = False  # also honest_llama's MC1/MC2 prompt on partition 3
    text: TextData | None = None  # CE / KL against the unmodified model
    options: ScoringOptions = ScoringOptions()
    bootstrap: int = Field(2000, ge=0)

    @model_validator(mode="after")
    def _ood_is_mc(self):
        if any(d.form != "mc" for d in self.ood):
            raise ValueError("ood: every dataset needs form: mc (the thesis evaluated the OOD sets as MC questions)")
        return self


def head_directions(acts, y):
    """Unit mass-mean direction (true - false) and sigma (np.std of the projections) of every head, float64:
    what the thesis' MassMeanClassifier fit on partition 1 stores as W_norm and std_dev. acts (N, L, H, d)."""
    import numpy as np

    x = np.asarray(acts, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    w = x[y].mean(0) - x[~y].mean(0)  # (L, H, d)
    u = w / np.linalg.norm(w, axis=-1, keepdims=True)
    proj = np.einsum("nlhd,lhd->nlh", x, u)
    return u, proj.std(0)  # (L, H, d), (L, H)


def run(cfg: Config, ctx) -> dict:
    import contextlib
    import json

    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    from llmrepro.lm import mc
    from llmrepro.lm.models import ModelConfig, load_model, load_tokenizer
    from llmrepro.representations import activations, datasets, plots, probes
    from llmrepro.representations.iti import Intervention, intervene

    dep = ctx.require(cfg.activations, "cache-activations")
    specs = {(d.get("label") or d["name"] + ("_mc" if d.get("form") == "mc" else "")): d for d in dep.params["datasets"]}
    if cfg.dataset not in specs:
        raise UserError(f"dataset {cfg.dataset} is not in {dep.path} (it has {', '.join(specs)})")
    spec = TruthData.model_validate(specs[cfg.dataset])
    if spec.form != "mc":
        raise UserError(f"dataset {cfg.dataset} of {dep.path} is not in MC form (ITI needs the MC statements)")
    acts, y, groups = activations.load(dep.path, cfg.dataset, "heads")
    part_labels = [json.loads(line)["partition"] for line in
                   (dep.path / "activations" / cfg.dataset / "statements.jsonl").read_text().splitlines()]
    items = datasets.mc_items(spec)
    by_group = {int(it.group): it for it in items}
    n_layers, n_heads = acts.shape[1], acts.shape[2]

    # 1. partitions (test folds), grouped by question and stratified on label x category
    splitter = StratifiedGroupKFold(n_splits=cfg.partitions, shuffle=True, random_state=cfg.seed)
    parts = [test for _, test in splitter.split(np.zeros(len(y)), part_labels, groups)][:3]
    par_groups = [sorted(set(groups[p].tolist())) for p in parts]
    # 2. partition 1: rank heads, directions and sigmas
    p1 = parts[0]
    head_acc = probes.rank_heads(np.asarray(acts[p1]), y[p1], groups[p1], cfg.ranking_cv.kind,
                                 cfg.ranking_cv.n_splits, cfg.seed, ctx.progress)
    order = probes.ranked_heads(head_acc)
    u, sigma = head_directions(acts[p1], y[p1])
    full = Intervention(order, np.stack([u[lh] for lh in order]), np.array([sigma[lh] for lh in order]), 0.0)

    model_cfg = ModelConfig.model_validate(dep.params["model"])
    tok = load_tokenizer(model_cfg)
    model = load_model(model_cfg, ctx=ctx).eval()

    def score(its, iv, mode="thesis"):
        with intervene(model, iv):
            return mc.SCORERS[mode](model, tok, its, cfg.options)

    # 3. partition 2: the grid
    par2 = [by_group[g] for g in par_groups[1]]
    if cfg.fixed is not None:
        alphas, ks = [cfg.fixed.alpha], [cfg.fixed.k]
    else:
        alphas = cfg.grid.alphas
        ks = cfg.grid.k if cfg.grid.k is not None else \
            [int(np.int32(n_layers * n_heads * f)) for f in cfg.grid.k_fractions]
    if max(ks) > len(order):
        raise UserError(f"K={max(ks)} but the model has only {len(order)} heads")
    grid = {"alphas": alphas, "K": ks, "p_true": [], "mc1": []}
    for alpha in ctx.progress(alphas, desc="alpha"):
        row_p, row_m = [], []
        for k in ks:
            r = score(par2, full.top(k, alpha))
            row_p.append(float(np.mean([x["p_true"] for x in r])))
            row_m.append(float(np.mean([x["mc1"] for x in r])))
        grid["p_true"].append(row_p)
        grid["mc1"].append(row_m)
    flat = np.asarray(grid[cfg.select_on]).reshape(-1)
    best = int(np.argmax(flat))  # first maximum, alpha outer and K inner, as the source's loop
    alpha_opt, k_opt = alphas[best // len(ks)], ks[best % len(ks)]
    chosen = full.top(k_opt, alpha_opt)
    full.alpha = alpha_opt
    full.save(ctx.dir / "intervention.npz")
    io.write_json(ctx.dir / "chosen.json", {"model": model_cfg.name, "alpha": alpha_opt, "K": k_opt,
                                             "select_on": cfg.select_on, "heads": [list(h) for h in chosen.heads]})

    # 4. partition 3 and OOD: chosen intervention vs base
    metrics: dict = {"iti_alpha": alpha_opt, "iti_K": k_opt, "par2_best": float(flat[best]),
                     "par_questions": [len(g) for g in par_groups], "best_head_acc": float(head_acc.max()),
                     "dirichlet_baseline": mc.dirichlet_baseline(items)}
    per_question: dict = {}
    evals = [("par3", [by_group[g] for g in par_groups[2]])] + \
        [(d.key, datasets.mc_items(d)) for d in cfg.ood]
    for name, its in ctx.progress(evals, desc="evaluate"):
        iti_rows, base_rows = score(its, chosen), score(its, None)
        for fig in ("p_true", "mc1"):
            a = np.array([r[fig] for r in iti_rows])
            b = np.array([r[fig] for r in base_rows])
            metrics[f"{fig}_{name}_iti"], metrics[f"{fig}_{name}_base"] = float(a.mean()), float(b.mean())
            metrics[f"{fig}_{name}_delta"] = float((a - b).mean())
            if cfg.bootstrap:
                for tag, v in (("iti", a), ("base", b), ("delta", a - b)):
                    lo, hi = mc.bootstrap_ci(v, k=cfg.bootstrap, seed=cfg.seed)
                    metrics[f"{fig}_{name}_{tag}_ci_low"], metrics[f"{fig}_{name}_{tag}_ci_high"] = lo, hi
        per_question[name] = {"iti": [r["p_true"] for r in iti_rows], "base": [r["p_true"] for r in base_rows]}
        if name != "par3":
            metrics[f"{name}_dirichlet_baseline"] = mc.dirichlet_baseline(its)
    if cfg.honest_llama:
        its = [by_group[g] for g in par_groups[2]]
        for tag, iv in (("iti", chosen), ("base", None)):
            r = score(its, iv, "honest_llama")
            for fig in ("mc1", "mc2"):
                metrics[f"honest_llama_{fig}_par3_{tag}"] = float(np.mean([x[fig] for x in r]))
    if cfg.text is not None:
        texts = mc.read_texts(cfg.text, ctx)
        ids = [x for x in (tok(t)["input_ids"][: cfg.text.max_tokens] for t in texts) if len(x) >= 2]
        metrics.update(mc.ce_and_kl(model, ids, modified=lambda: intervene(model, chosen),
                                    original=contextlib.nullcontext))
        metrics.update({f"{k}_base": v for k, v in mc.ce_and_kl(model, ids, modified=contextlib.nullcontext,
                                                                 original=contextlib.nullcontext).items()})
    io.write_json(ctx.dir / "grid.json", grid)
    io.write_json(ctx.dir / "head_accuracy.json", {"accuracy": head_acc.tolist(), "ranked": order[:64]})
    io.write_json(ctx.dir / "per_question.json", per_question)
    plots.grid(grid, ctx.dir / "grid.png")
    plots.heads(head_acc, f"{cfg.dataset} partition 1: mass-mean CV accuracy per head ({cfg.ranking_cv.kind})",
                ctx.dir / "head_accuracy.png")
    io.write_text(ctx.dir / "report.md", report(model_cfg.name, metrics, grid, [n for n, _ in evals]))
    return metrics


def report(model: str, m: dict, grid: dict, evals: list[str]) -> str:
    rows = []
    for name in evals:
        for tag in ("iti", "base", "delta"):
            lo, hi = m.get(f"p_true_{name}_{tag}_ci_low"), m.get(f"p_true_{name}_{tag}_ci_high")
            rows.append([name, tag, m[f"p_true_{name}_{tag}"], f"[{lo:.3f}, {hi:.3f}]" if lo is not None else "",
                         m[f"mc1_{name}_{tag}"]])
    lines = [f"# ITI on {model}", "",
             f"Chosen on partition 2: alpha = {m['iti_alpha']:g}, K = {m['iti_K']} (mean {m['par2_best']:.3f}); "
             f"questions per partition {m['par_questions']}; best head probe accuracy {m['best_head_acc']:.3f}; "
             f"random (Dirichlet) baseline {m['dirichlet_baseline']:.3f}.", "",
             io.table(rows, ["evaluated on", "model", "mean p_true (MC2)", "95% CI (bootstrap)", "MC1"], "markdown"),
             "", "![grid](grid.png)", "", "![heads](head_accuracy.png)"]
    hl = [k for k in m if k.startswith("honest_llama_")]
    if hl:
        lines += ["", "honest_llama prompt, partition 3: " + ", ".join(f"{k} {m[k]:.3f}" for k in hl)]
    if "ce" in m:
        lines += ["", f"CE {m['ce']:.3f} (base {m['ce_base']:.3f}), KL vs base {m['kl']:.4f}"]
    return "\n".join(lines) + "\n"
