"""extract-gradients: per-sample loss gradients, optionally randomly projected, stored in shards.

Reproduces `extract_gradients.py` (with `olmo_training_utils.py` and `util.py`) of the 'Gradient dimensionality
reduction for instance-based explainability' project @ d73147d: for every sample, the gradient of its loss
with respect to the input embeddings (T x d, padded to `max_length` and flattened), projected with traker
(`normal` | `rademacher`, seed 42, model_id 0, default 16384 dims) or kept in full, stored
`gradients_per_file` to a file under `gradients/{type}_{dim}|full/{model}/{dataset}/{split}/{checkpoint}/
{start}_{end}` as an (n, 1, D) tensor (full gradients in `grad_dtype`, projections float32 as fast_jl returns
them), or only their mean (`mode: store_mean`). Chat rows get the source's template (`template: source`,
`llmrepro.lm.templates.GDR_OLMO_TEMPLATE`: every non-user role renders as `<|assistant|>`, no BOS/EOS, and
the `<|assistant|>` prefix is labelled) or the model's own (`template: model`). Paradigms `pre`, `mlm`
(the source's deterministic masking, drawn on the row padded to max_length, epoch = checkpoint index) and
`sft`, as in `llmrepro.gradients.encoding`. The model is read at a checkpoint index into its revisions (for
hub models the source's list: the stage1 branches by step, the stage2 ones by ingredient and step, `main`).

Added: `target: parameters | lora` (per-sample parameter gradients via vmap), and for those targets
`projection.projector: factored`: the LoGra-style Kronecker projection computed tensor by tensor from each
layer's captured inputs and output gradients without building the gradient (`llmrepro.gradients.factored`;
`dim` split over the tensors by `projection.dims`, stored as the per-tensor projections concatenated in
parameter order, folder `factored_{type}_{dim}`; another projection than a dense matrix); `shard_start`/`shard_end`
to split one extraction across a cluster array, and `merge: true` to gather the shards of this
experiment's other runs into one run that equals a single-process extraction:

    llmrepro run gradients/X shard_start=0 shard_end=1   # ... one task per shard range
    llmrepro run gradients/X merge=true                  # checks that every shard is there

Deliberate differences from the source (bug fixes or speed):
- batches of `batch_size` samples, one backward pass each (exact: samples never interact; the source ran one
  sample per pass);
- `padding: longest` (default) pads a batch to its longest sample and masks the padding out; the source padded
  every sample to max_length and gave the model no attention mask (`padding: max_length` does that). For a
  causal LM the two agree in exact arithmetic (no position sees the padding to its right, padding is
  unlabelled), and the input gradient is zero-padded to max_length either way; a bidirectional (mlm) model
  attends to the padding the source's way;
- the model runs in eval mode (the source called `model.train()`: the same for OLMo-2, which has no dropout;
  dropout-random for BERT/RoBERTa);
- every model is loaded with its weights; the source built Llama and RoBERTa from their config only
  (randomly initialised);
- the projector gets up to `max_batch_size` rows per call, the source one (fast_jl computes every row on its
  own: the same values); `projector: basic` (traker's BasicProjector, another matrix) runs without a GPU;
- shards are written atomically with a completion marker, and `--resume` skips finished ones; an error stops
  the run (the source's bare `except` skipped the chunk, out-of-memory included); the last, shorter shard is
  kept (the source's range ran past the dataset, which dropped that chunk: 100 test rows at 1000 per file gave
  no file);
- `store_mean` accumulates in float32 and projects when `projection` is set (the source summed in float16
  and never projected in store_mean, though it named the folder `{type}_{dim}`);
- the `pre` paradigm reads chat rows through the chat template (the source read only `text` columns, or a
  prompt/completion pair); alpaca-style data keeps the configured paradigm and max_length (the source forced
  `pre` and 4096 tokens);
- a zero-label sample (prompt longer than max_length) has loss 0, not NaN; its gradient is all zeros in both.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core import io
from llmrepro.core.config import RecipeConfig
from llmrepro.core.errors import UserError
from llmrepro.gradients import encoding, shards
from llmrepro.gradients.projection import Projection
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.models import ModelConfig, default_device, load_model, load_tokenizer, locate

SHARD_KEYS = ("shard_start", "shard_end", "merge", "tracking")  # what may differ between runs of one extraction


class Config(RecipeConfig):
    model: ModelConfig
    data: DataConfig
    paradigm: encoding.Paradigm = "sft"
    target: encoding.Target = "inputs_embeds"
    template: encoding.Template = "source"  # chat rows: the source's OLMo template, or the model's own
    padding: encoding.Padding = "longest"  # max_length: every sample padded to max_length, no mask (the source)
    checkpoint: int | str = 0  # index into the model's revisions, or a revision name
    revisions: list[str] | None = None  # the revisions an index refers to (default: the hub's branches)
    projection: Projection | None = None  # none: store full gradients
    mode: Literal["store", "store_mean"] = "store"
    gradients_per_file: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(4096, ge=2)  # tokens; inputs_embeds gradients are zero-padded to this length
    grad_dtype: Literal["float16", "float32"] = "float16"  # the source stored (and projected) half precision
    vmap_chunk_size: int | None = Field(None, ge=1)  # parameter targets: samples differentiated at once
    device: str | None = None  # default: cuda when available, else cpu
    shard_start: int = Field(0, ge=0)  # first shard (of gradients_per_file samples) this run computes
    shard_end: int | None = Field(None, ge=1)  # one past the last shard; none: to the end
    merge: bool = False  # gather finished shards from this experiment's other runs instead of computing

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.revision is not None:
            raise ValueError("set the model revision through checkpoint (an index or a revision name), "
                             "not model.revision")
        if self.data.format != "chat" and self.paradigm == "sft":
            raise ValueError(f"paradigm sft needs chat data (data.format: chat), not {self.data.format}")
        if self.data.format not in ("chat", "alpaca", "dolly", "evol-instruct", "hc3", "true-false"):
            raise ValueError(f"data.format {self.data.format} has no training text; use chat, alpaca-style or true-false")
        if (self.target == "lora") != (self.model.lora is not None):
            raise ValueError("target lora and model.lora go together: set both or neither")
        if self.projection is not None and self.projection.projector.value == "factored" and self.target == "inputs_embeds":
            raise ValueError("projection.projector factored projects parameter gradients from their factors: "
                             "set target: parameters or lora (input-embedding gradients use basic or cuda)")
        if self.shard_end is not None and self.shard_end <= self.shard_start:
            raise ValueError(f"shard_end ({self.shard_end}) must be greater than shard_start ({self.shard_start})")
        return self


# ------------------------------------------------------------------------------------------ checkpoints

def _stage_key(branch: str) -> tuple:
    """OLMo branch names `stage1-step1000-tokens5B`, `stage2-ingredient1-step1000-tokens5B`: (stage, ingr., step)."""
    nums = {k: int(v) for k, v in re.findall(r"(stage|ingredient|step)(\d+)", branch)}
    return nums.get("stage", 0), nums.get("ingredient", 0), nums.get("step", 0), branch


def order_revisions(branches: list[str]) -> list[str]:
    """The source's checkpoint list (util.get_checkpoints_olmo): the `stage1` branches by step, the `stage2`
    ones by (ingredient, step), then `main`; other branches are not checkpoints."""
    staged = [b for b in branches if b != "main" and ("stage1" in b or "stage2" in b)]
    return sorted(staged, key=_stage_key) + ["main"]


def hub_revisions(name: str) -> list[str]:
    """The hub branches of `name` in the source's checkpoint order."""
    from huggingface_hub import list_repo_refs

    try:
        branches = [b.name for b in list_repo_refs(name).branches]
    except Exception as err:  # offline, unknown repo, no access: all end here
        raise UserError(f"checkpoint index for '{name}' needs the hub's list of revisions, which failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                        "give checkpoint as a revision name instead") from None
    return order_revisions(branches)


def resolve_checkpoint(cfg: Config) -> str:
    """The revision name `cfg.checkpoint` refers to."""
    if isinstance(cfg.checkpoint, str):
        return cfg.checkpoint
    if cfg.revisions is not None:
        revisions = cfg.revisions
    elif locate(cfg.model)[1]["source"] == "hub":
        revisions = hub_revisions(cfg.model.name)
    else:
        revisions = ["main"]  # a tiny or local model is its only checkpoint
    if not 0 <= cfg.checkpoint < len(revisions):
        raise UserError(f"checkpoint index {cfg.checkpoint} out of range ({len(revisions)} checkpoints)")
    return revisions[cfg.checkpoint]


# ------------------------------------------------------------------------------------------ extraction
#
# rows --encode--> examples --collate--> batch --batch_grads--> (B, grad_dim) --projector--> (B, dim) --> shard
#
# `projector: factored` (parameter/LoRA targets) replaces the flat `batch_grads` + `projector.project` pair:
# each layer's inputs and output gradients are captured in one batched backward (`gradients.capture`) and
# projected tensor by tensor from those factors (`gradients.factored.FactoredProjector`), never building the
# gradient; the (B, sum of per-tensor dims) rows are the per-tensor projections concatenated in parameter order.

def grad_dim(model, cfg: Config) -> int:
    from llmrepro.gradients import per_sample

    if cfg.target == "inputs_embeds":
        return cfg.max_length * model.get_input_embeddings().embedding_dim
    return sum(p.numel() for p in per_sample.select_params(model, cfg.target).values())


def collate(examples: list[dict], pad_id: int, cfg: Config) -> dict:
    source = cfg.padding == "max_length"
    return encoding.collate(examples, pad_id, length=cfg.max_length if source else None, attend_padding=source)


def batch_grads(model, batch: dict, cfg: Config):
    """(B, grad_dim) flattened per-sample gradients; input gradients zero-padded to max_length tokens."""
    import torch

    from llmrepro.gradients import per_sample

    if cfg.target == "inputs_embeds":
        g = per_sample.input_grads(model, batch, cfg.paradigm)  # (B, T, d)
        g = torch.nn.functional.pad(g, (0, 0, 0, cfg.max_length - g.shape[1]))  # (B, max_length, d)
        return g.flatten(start_dim=1)  # position-major, as the source flattened its (T, d) gradient
    return per_sample.flatten(per_sample.per_sample_grads(model, batch, cfg.paradigm, cfg.target, cfg.vmap_chunk_size))


def extract_range(model, examples: list[dict], pad_id: int, cfg: Config, projector):
    """Gradients of `examples`, in order: (n, grad_dim) in grad_dtype, or projected (n, dim) float32."""
    import torch

    from llmrepro.gradients import capture
    from llmrepro.gradients.factored import FactoredProjector

    dtype = getattr(torch, cfg.grad_dtype)
    rows = []
    for i in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[i:i + cfg.batch_size], pad_id, cfg)
        if isinstance(projector, FactoredProjector):  # from the factors, in float32: no gradient to round
            projected = projector(capture.capture(model, batch, cfg.paradigm, projector.plan))
            rows.append(torch.cat([projected[n].float() for n in projector.dims], dim=1).cpu())
            continue
        g = batch_grads(model, batch, cfg).detach().to(dtype)
        rows.append((projector.project(g) if projector else g).cpu())  # the source projected the half gradient
    return torch.cat(rows)


def make_projector(model, cfg: Config, dim: int, device):
    """The projector of cfg.projection: traker's (basic, cuda) over the flat gradient, or the factored one."""
    from llmrepro.gradients.projection import Projector

    if cfg.projection is None:
        return None
    if cfg.projection.projector.value != "factored":
        return Projector(cfg.projection, dim, device)
    from llmrepro.gradients import capture, per_sample
    from llmrepro.gradients.dot_products import split_dims
    from llmrepro.gradients.factored import FactoredProjector

    params = per_sample.select_params(model, cfg.target)
    plan = capture.capture_plan(model, params)
    dims = split_dims({n: p.numel() for n, p in params.items()}, cfg.projection.dim, 1, cfg.projection.dims)
    return FactoredProjector(plan, dims, cfg.projection.type.value, cfg.projection.seed, device,
                             cfg.projection.max_matrix_mb, total=cfg.projection.dim)


def write_mean(out: Path, n: int, per_file: int):
    """Sum the per-shard sums (in shard order) into `mean`, (1, D)."""
    mean = shards.load_all(out / "sums", n, per_file).sum(dim=0, keepdim=True) / n
    shards.save(out / "mean", mean)
    return mean


def stored_norm_mean(directory: Path, wanted: list[tuple[int, int]]) -> float:
    import torch

    norms = [shards.read_rows(directory, *r).float().norm(dim=1) for r in wanted]
    return torch.cat(norms).mean().item() if norms else 0.0


def run(cfg: Config, ctx) -> dict:
    import torch

    from llmrepro.training import memory

    if cfg.merge:
        return merge_runs(cfg, ctx)
    device = torch.device(cfg.device or default_device())
    revision = resolve_checkpoint(cfg)
    model_cfg = cfg.model.model_copy(update={"revision": revision if locate(cfg.model)[1]["source"] == "hub" else None})
    tokenizer = load_tokenizer(model_cfg)
    if cfg.data.format == "chat":
        encoding.use_template(tokenizer, cfg.template)
    rows = data.load_rows(cfg.data, ctx)
    model = load_model(model_cfg, task="masked-lm" if cfg.paradigm == "mlm" else "causal-lm", ctx=ctx)
    if not cfg.model.device_map:
        model.to(device)
    model.eval()

    folder = cfg.projection.folder if cfg.projection else "full"
    out = shards.gradient_dir(ctx.dir / "gradients", folder, cfg.model.name, cfg.data.name, cfg.data.split, revision)
    dim = grad_dim(model, cfg)
    projector = make_projector(model, cfg, dim, device)
    shards.check_meta(out, {
        "samples": len(rows), "gradients_per_file": cfg.gradients_per_file, "mode": cfg.mode, "target": cfg.target,
        "paradigm": cfg.paradigm, "template": cfg.template if cfg.data.format == "chat" else None,
        "padding": cfg.padding, "revision": revision, "grad_dim": dim, "grad_dtype": cfg.grad_dtype,
        "max_length": cfg.max_length, "layout": "(n, 1, D)",
        "projection": projector.describe() if projector else None})

    all_ranges = shards.ranges(len(rows), cfg.gradients_per_file)
    todo = all_ranges[cfg.shard_start:cfg.shard_end]
    if not todo:
        ctx.log.warning("shards %d..%s: none exist (%d shards in all); nothing to do",
                        cfg.shard_start, cfg.shard_end, len(all_ranges))
    target_dir = out / "sums" if cfg.mode == "store_mean" else out
    epoch = cfg.checkpoint if isinstance(cfg.checkpoint, int) else 0  # the source's MLM masking epoch
    keep_padding = cfg.padding == "max_length"
    memory.reset_peak()
    started, computed, skipped = time.perf_counter(), 0, 0
    for start, end in ctx.progress(todo, desc="shards", total=len(todo)):
        if shards.is_done(target_dir, start, end):
            skipped += 1
            continue
        examples = [encoding.encode(rows[i], cfg.data.format, tokenizer, cfg.paradigm, cfg.max_length, epoch,
                                    keep_padding=keep_padding) for i in range(start, end)]
        g = extract_range(model, examples, tokenizer.pad_token_id, cfg, projector)  # (n, D)
        if cfg.mode == "store_mean":
            shards.write(target_dir, start, end, g.float().sum(dim=0, keepdim=True))  # (1, D)
        else:
            shards.write(target_dir, start, end, g.unsqueeze(1))  # (n, 1, D), the source's layout
        computed += end - start
        ctx.log.info("shard %s: %d samples", shards.name(start, end), end - start)
    elapsed = time.perf_counter() - started

    metrics = {"samples": len(rows), "shards_total": len(all_ranges), "shards_in_range": len(todo),
               "shards_skipped": skipped, "samples_computed": computed, "grad_dim": dim,
               "dim": cfg.projection.dim if cfg.projection else dim}
    if projector is not None and "dims_used" in projector.describe():
        metrics["dims_used"] = projector.describe()["dims_used"]
    if cfg.mode == "store_mean" and len(todo) == len(all_ranges):
        metrics["mean_norm"] = write_mean(out, len(rows), cfg.gradients_per_file).float().norm().item()
    elif cfg.mode == "store":
        metrics["grad_norm_mean"] = stored_norm_mean(out, todo)
    metrics.update(extract_time_s=elapsed, samples_per_s=computed / elapsed if computed else 0.0,
                   peak_memory_mb=memory.peak_mb())
    ctx.log_metrics(metrics)
    return metrics


# ------------------------------------------------------------------------------------------ merging

def _shared_params(run_dir: Path) -> dict | None:
    import yaml

    try:
        params = yaml.safe_load((run_dir / "config.yaml").read_text())["params"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    return {k: v for k, v in params.items() if k not in SHARD_KEYS}


def merge_runs(cfg: Config, ctx) -> dict:
    """Gather the shards of this experiment's runs with the same settings (any shard range) into ctx.dir."""
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SHARD_KEYS}
    runs = sorted(d for d in ctx.dir.parent.iterdir() if d != ctx.dir and _shared_params(d) == mine)
    found = [(d, m.parent) for d in runs for m in (d / "gradients").glob("**/extraction.json")]
    if not found:
        raise UserError(f"merge: no runs of this extraction under {ctx.dir.parent} to merge; "
                        "run its shard ranges first (shard_start=... shard_end=...)")
    metas = {json.dumps(io.read_json(g / "extraction.json"), sort_keys=True) for _, g in found}
    if len(metas) > 1:
        raise UserError(f"merge: the runs under {ctx.dir.parent} made their shards differently "
                        "(extraction.json differs); re-run them with the same settings")
    meta = io.read_json(found[0][1] / "extraction.json")
    out = ctx.dir / found[0][1].relative_to(found[0][0])
    shards.check_meta(out, meta)
    wanted = shards.ranges(meta["samples"], meta["gradients_per_file"])
    sub = "sums" if meta["mode"] == "store_mean" else "."
    shards.merge([(g / sub) for _, g in found], out / sub, wanted)
    ctx.log.info("merged %d shards from %d runs into %s", len(wanted), len(found), out)
    metrics = {"samples": meta["samples"], "shards_total": len(wanted), "runs_merged": len(found)}
    if meta["mode"] == "store_mean":
        metrics["mean_norm"] = write_mean(out, meta["samples"], meta["gradients_per_file"]).float().norm().item()
    else:
        metrics["grad_norm_mean"] = stored_norm_mean(out, wanted)
    return metrics
