"""cache-activations: per-head o_proj inputs and per-layer residual streams at each statement's last token, for
the thesis' truth datasets, streamed to disk; optionally the model's own few-shot judgement of the same data.

Reproduces the thesis' activation runs (Detection notebook @ c43c1f5 cells 9-12; the same code in every ITI run
notebook, cell 27 @ a0bb04c): a forward pre-hook on each layer's o_proj (OPT: out_proj, which the thesis patched in
as o_proj), `tokenizer.encode(statement)` with the default special tokens, no chat template, float16 storage as
[N, layers, heads, head_dim], labels and groups; the detection sets cut to their first 4000 rows. Models were
4-bit bitsandbytes with fp16 compute and the default quant type **fp4** (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_compute_dtype=float16)`, nothing else; the issue's "nf4" does not match the source): the experiments set
`model: {quantization: 4bit, quant_type: fp4, quant_compute_dtype: float16}`.

Model judgement (`judge`): the thesis' few-shot likelihood judge (`FewShotLikelihoodJudge`, ITI cell 33) on each
dataset's MC form (six few-shot groups removed, "Q: {question}\\nA: " + choice): per question p_true, and the
model counts as right when p_true > 0.5 (for 2-choice sets: the true answer is more likely than the false one).
The ProbeVsModel notebook (p(Yes|q) > p(No|q)) is missing from the repository; this is the prompt the thesis' code
builds for the same comparison.

Deliberate differences from the source: right-padded batches (`batch_size`; 1 = the source's loop) instead of one
statement at a time; the residual stream is cached too (geometry-of-truth's probes, the thesis' ProbeVsModel);
.npy files written batch by batch instead of one np.savez at the end (flat memory, resumable).
"""

from __future__ import annotations

import json
import time

from pydantic import Field

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig
from llmrepro.lm.mc import ScoringOptions
from llmrepro.lm.models import ModelConfig
from llmrepro.representations.datasets import TruthData


class Config(RecipeConfig):
    model: ModelConfig
    datasets: list[TruthData] = Field(min_length=1)
    batch_size: int = Field(16, ge=1)
    heads: bool = True  # per-head o_proj inputs [N, L, H, d]
    resid: bool = True  # residual stream after every decoder layer [N, L, D]
    judge: bool = False  # the model's few-shot judgement on each dataset's MC form (where it has one)
    judge_options: ScoringOptions = ScoringOptions()


def run(cfg: Config, ctx) -> dict:
    import torch

    from llmrepro.lm import layers, mc
    from llmrepro.lm.models import load_model, load_tokenizer
    from llmrepro.representations import activations, datasets, hooks

    keys = [d.key for d in cfg.datasets]
    if len(set(keys)) != len(keys):
        from llmrepro.core.errors import UserError

        raise UserError(f"datasets: two entries store under the same name ({', '.join(keys)}); set label")
    data = {d.key: datasets.statements(d) for d in cfg.datasets}  # all read (and checked) before the model loads
    for d in cfg.datasets:
        for attr in ("path", "mc_path"):
            if getattr(d, attr):
                ctx.record_input("datasets", getattr(d, attr), sha256=io.sha256_file(getattr(d, attr)))
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, ctx=ctx).eval()
    n_heads, head_dim = hooks.head_shape(model)
    metrics: dict = {"layers": len(layers.decoder_layers(model)), "heads": n_heads, "head_dim": head_dim}
    total, started = 0, time.perf_counter()
    for d in cfg.datasets:
        st = data[d.key]
        out = ctx.dir / "activations" / d.key
        shapes = activations.cache(model, tok, st.texts, st.labels, st.groups, out, cfg.batch_size, cfg.heads,
                                   cfg.resid, progress=ctx.progress, resume=ctx.resume)
        with open(out / "statements.jsonl", "w") as f:
            for t, y, g, p in zip(st.texts, st.labels, st.groups, st.partition, strict=True):
                f.write(json.dumps({"statement": t, "label": y, "group": g, "partition": p}) + "\n")
        io.write_json(out / "meta.json", {"dataset": d.model_dump(), "shapes": shapes})
        metrics[f"{d.key}_statements"] = len(st.texts)
        metrics[f"{d.key}_true_fraction"] = sum(st.labels) / len(st.labels)
        total += len(st.texts)
    metrics["statements_per_s"] = total / (time.perf_counter() - started)
    if cfg.judge:
        judgements = {}
        for d in cfg.datasets:
            if d.name not in ("truthfulqa", "politicians", "cities", "neg_cities", "common_claim_true_false",
                              "counterfact_true_false"):
                continue
            items = datasets.mc_items(d.model_copy(update={"form": "mc"}))
            with torch.no_grad():
                rows = mc.score_thesis(model, tok, items, cfg.judge_options)
            p = [r["p_true"] for r in rows]
            correct = sum(r["correct"] for r in rows)
            lo, hi = mc.jeffreys_ci(int(correct), len(rows))
            judgements[d.key] = {"questions": len(rows), "accuracy": correct / len(rows), "ci": [lo, hi],
                                 "mean_p_true": sum(p) / len(p), "p_true": p}
            metrics[f"{d.key}_model_accuracy"] = correct / len(rows)
            metrics[f"{d.key}_model_p_true"] = sum(p) / len(p)
        io.write_json(ctx.dir / "judgement.json", judgements)
    io.write_text(ctx.dir / "report.md", report(cfg, metrics))
    return metrics


def report(cfg: Config, m: dict) -> str:
    rows = [[d.key, d.form, d.path or "fixture", m[f"{d.key}_statements"], m[f"{d.key}_true_fraction"],
             m.get(f"{d.key}_model_accuracy"), m.get(f"{d.key}_model_p_true")] for d in cfg.datasets]
    return "\n".join([
        f"# cache-activations: {cfg.model.name}", "",
        f"{m['layers']} layers x {m['heads']} heads x {m['head_dim']}; cached: "
        + ", ".join(k for k, on in (("heads [N, L, H, d]", cfg.heads), ("resid [N, L, D]", cfg.resid)) if on)
        + f"; {m['statements_per_s']:.1f} statements/s.", "",
        io.table(rows, ["dataset", "form", "file", "statements", "true fraction", "model accuracy (few-shot)",
                        "model mean p_true"], "markdown")]) + "\n"
