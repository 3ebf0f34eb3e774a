"""Pairs of samples for gradient similarity: the originals (LIMA), their variants (paraphrased or
model-generated, linked by id), each variant's BM25 candidates, and the dot products of a pair set.

What the source did (lukas-hinterleitner/master-thesis @ e6ebdbe):
- originals: the Tulu v2 mixture rows with `dataset == "lima"` and exactly two messages (`paraphrase.py`
  lines 24 and 29: it counts the messages, it does not check their roles): 988 rows, in mixture order;
- variants: the published hub datasets, read by column (`src/dataset.py`): `paraphrased_messages` of
  `lukashinterleitner/LIMA-paraphrased-GPT-4o-mini`, `model_generated_messages` of
  `lukashinterleitner/LIMA-model-generated-amd-AMD-OLMo-1B-SFT`; each variant's original has its id;
- tokenisation: open-instruct's `SFTDatasetProcessor.tokenize` with the tulu template forced onto the
  tokenizer, the prompt (`messages[:-1]` with the generation prompt) masked by its token count, and no
  truncation (its length filter is commented out, so 3,000-token LIMA answers go in whole);
- gradients: `model(input_ids, labels, attention_mask).loss.backward()` one sample at a time, float32, model
  in eval mode, every parameter.

`PairsConfig` is the config section gradient-similarity and layer-dot-products share. Variants come from
`variants_data` (a dataset in the published layout: the default of the real experiments), `variants` (a
make-variants run: new models or paraphrasers), or neither (the originals reworded by `rules_paraphrase`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llmrepro.core.config import RecipeConfig, RunRef, Strict
from llmrepro.core.errors import UserError
from llmrepro.gradients.candidates import TOP_K, Ties, bm25_candidates, first_message
from llmrepro.gradients.dot_products import (
    DimsRule,
    DotProducts,
    ProjectionSet,
    TensorProjector,
    projection_total,
    split_dims,
    stream_dot_products,
)
from llmrepro.lm import data
from llmrepro.lm.data import DataConfig
from llmrepro.lm.fixtures.chat import rules_paraphrase
from llmrepro.lm.models import ModelConfig

Method = Literal["vmap", "hooks", "ghost"]
VARIANT_COLUMNS = {"paraphrased": "paraphrased_messages", "model-generated": "model_generated_messages",
                   "chat": "messages"}  # data format -> the column that holds the variant's messages


def lima_rows(rows: list[dict], dataset: str | None = "lima") -> list[dict]:
    """The source's selection: rows whose `dataset` is `dataset` (None: any) with exactly two messages."""
    if dataset is not None:
        if rows and "dataset" not in rows[0]:
            raise UserError(f"the originals have no 'dataset' column to keep dataset == {dataset!r} by; "
                            "set dataset_filter: null")
        rows = [r for r in rows if r.get("dataset") == dataset]
    return [r for r in rows if len(r["messages"]) == 2]


def rules_variants(originals: list[dict]) -> list[dict]:
    return [{"id": r["id"], "dataset": r.get("dataset"), "kind": "paraphrased",
             "messages": [{"role": m["role"], "content": rules_paraphrase(m["content"])} for m in r["messages"]]}
            for r in originals]


def variant_rows(rows: list[dict], fmt: str, source: str) -> list[dict]:
    """Rows of a published variants dataset -> [{id, messages}], the variant read from its column by name."""
    column = VARIANT_COLUMNS.get(fmt)
    if column is None:
        raise UserError(f"{source}: variants need format paraphrased, model-generated or chat, not {fmt}")
    out, seen = [], set()
    for i, row in enumerate(rows):
        msgs = row[column]
        if not isinstance(msgs, list) or len(msgs) != 2 or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise UserError(f"{source}: row {i} ({row.get('id')}): '{column}' must be two messages "
                            "[user, assistant] with role and content")
        if row["id"] in seen:
            raise UserError(f"{source}: id {row['id']} appears twice")
        seen.add(row["id"])
        out.append({"id": row["id"], "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    return out


def read_variants(path: str | Path) -> list[dict]:
    """Rows of a variants.jsonl (or of the one in a run directory), checked for id and [user, assistant]."""
    p = Path(path).expanduser()
    p = p / "variants.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"variants not found: {p} (run make-variants first, or give its run directory)")
    try:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not JSON lines ({err})") from None
    for i, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        roles = [m.get("role") for m in msgs] if isinstance(msgs, list) else None
        if "id" not in row or roles != ["user", "assistant"]:
            raise UserError(f"{p}: row {i}: expected an 'id' and messages [user, assistant]")
    if not rows:
        raise UserError(f"{p}: no rows")
    return rows


class ProjectionConfig(Strict):
    """Random projection of each tensor's gradient, as the source's `__project_gradients_layerwise`."""

    fractions: list[float] = Field([0.01, 0.05], min_length=1)  # of the parameter count; the source's 1% and 5%
    type: Literal["rademacher", "normal"] = "rademacher"
    # cuda: traker's fast_jl kernel, as the source; basic: traker's BasicProjector, any device; factored: the
    # LoGra-style Kronecker projection from captured factors (`gradients.factored`, another projection)
    projector: Literal["basic", "cuda", "factored"] = "cuda"
    dims: DimsRule = "source"  # source: each tensor max(512, share rounded to 512); exact: parts sum to the total
    input_dtype: Literal["float16", "float32"] = "float16"  # the source rounded gradients to float16 first (not factored)
    max_matrix_mb: int = Field(1024, ge=1)  # basic: memory for one block of a tensor's random matrix
    max_batch_size: Literal[8, 16, 32] = 8  # cuda: rows per kernel call (the source's 8)

    @model_validator(mode="after")
    def _fractions(self):
        if any(not 0 < f <= 1 for f in self.fractions) or len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions must be distinct, in (0, 1]: {self.fractions}")
        return self

    @staticmethod
    def label(fraction: float) -> str:
        """The metric suffix of a fraction: 0.01 -> '1pct'."""
        return f"{fraction * 100:g}pct".replace(".", "_")

    def projector_set(self, sizes: dict[str, int], seed: int, device, plan=None) -> tuple[ProjectionSet, dict[str, int]]:
        """The projections of all fractions, and each label's nominal total dimension. `factored` needs the
        model's capture plan (`capture.capture_plan`) and is then fed captured gradients."""
        from llmrepro.gradients.projection import Projection

        n = sum(sizes.values())
        totals = {self.label(f): projection_total(n, f) for f in self.fractions}
        if self.projector == "factored":
            from llmrepro.gradients.factored import FactoredProjector

            projectors = {label: FactoredProjector(plan, split_dims(sizes, total, 1, self.dims), self.type, seed,
                                                   device, self.max_matrix_mb)
                          for label, total in totals.items()}
            return ProjectionSet(projectors), totals
        projectors = {label: TensorProjector(sizes, Projection(dim=total, type=self.type, projector=self.projector,
                                                               seed=seed, max_matrix_mb=self.max_matrix_mb,
                                                               max_batch_size=self.max_batch_size),
                                             device, dims=self.dims, input_dtype=self.input_dtype)
                      for label, total in totals.items()}
        return ProjectionSet(projectors), totals


class PairsConfig(RecipeConfig):
    """What gradient-similarity and layer-dot-products share: model, originals, variants, candidates, schedule."""

    model: ModelConfig
    data: DataConfig  # the originals: chat rows (the Tulu v2 mixture)
    dataset_filter: str | None = "lima"  # keep rows with this `dataset` (and exactly two messages); None: any dataset
    variants_data: DataConfig | None = None  # published variants (format paraphrased | model-generated), joined on id
    variants: RunRef | None = None  # or a make-variants run; neither: rules_paraphrase of the originals
    top_k: int = Field(TOP_K, ge=1)
    bm25_ties: Ties = "argsort"  # argsort: numpy's default sort, as the source; stable: ties in corpus order
    chat_template: Literal["tulu", "model"] = "tulu"  # tulu: open-instruct's, forced as the source; model: its own
    max_length: int | None = Field(None, ge=8)  # None: no truncation, as the source
    expect_eos_token_id: int | None = None  # fail unless the tokenizer's EOS is this id (AMD-OLMo: 50279)
    # per-sample gradients: vmap (torch.func, eager attention); hooks: built from each layer's inputs and output
    # gradients captured in one batched backward (`gradients.capture`); ghost: as hooks, with the dot products of
    # linear layers where 2 T^2 <= d_in d_out taken from those factors without building the gradients
    method: Method = "vmap"
    chunk_size: int = Field(8, ge=1)  # variant gradients held at once
    batch_size: int = Field(8, ge=1)  # samples differentiated per vmap call (candidates per batch)
    partition_start: int = Field(0, ge=0)  # variants [start, end) of this job
    partition_end: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.data.format != "chat":
            raise ValueError("needs chat data (data.format: chat)")
        if self.variants_data is not None and self.variants is not None:
            raise ValueError("give variants_data (a published variants dataset) or variants (a make-variants run), "
                             "not both")
        if self.variants_data is not None and self.variants_data.format not in VARIANT_COLUMNS:
            raise ValueError(f"variants_data.format must be one of {', '.join(VARIANT_COLUMNS)}")
        if self.partition_end is not None and self.partition_end <= self.partition_start:
            raise ValueError(f"partition_end ({self.partition_end}) must be greater than partition_start "
                             f"({self.partition_start})")
        return self


@dataclass
class Pairs:
    variants: list[dict]
    originals: list[dict]
    candidates: list[list[int]]

    @property
    def p_ids(self) -> list[str]:
        return [r["id"] for r in self.variants]

    @property
    def o_ids(self) -> list[str]:
        return [r["id"] for r in self.originals]


def load_variants(cfg: PairsConfig, originals: list[dict], ctx) -> list[dict]:
    if cfg.variants_data is not None:
        return variant_rows(data.load_rows(cfg.variants_data, ctx), cfg.variants_data.format, cfg.variants_data.name)
    if cfg.variants is not None:
        return read_variants(ctx.require(cfg.variants, "make-variants").path)
    return rules_variants(originals)


def load_pairs(cfg: PairsConfig, ctx) -> Pairs:
    """Originals, variants (linked by id) and each variant's BM25 candidates."""
    originals = lima_rows(data.load_rows(cfg.data, ctx), cfg.dataset_filter)
    if not originals:
        what = f"dataset == {cfg.dataset_filter!r} and " if cfg.dataset_filter else ""
        raise UserError(f"{cfg.data.name}: no rows with {what}exactly two messages")
    variants = load_variants(cfg, originals, ctx)
    index = {r["id"]: i for i, r in enumerate(originals)}
    if not any(v["id"] in index for v in variants):
        raise UserError("no variant has the id of an original: the variants do not belong to these originals")
    if cfg.partition_start >= len(variants):
        raise UserError(f"partition_start={cfg.partition_start} is past the last of {len(variants)} variants")
    candidates = bm25_candidates([first_message(v) for v in variants], [first_message(o) for o in originals],
                                 [index.get(v["id"]) for v in variants], cfg.top_k, cfg.bm25_ties)
    return Pairs(variants, originals, candidates)


def force_template(tokenizer, name: str) -> None:
    """Put open-instruct's template `name` on the tokenizer, as the source did (`src/model.py` get_tokenizer);
    `model` keeps the tokenizer's own."""
    from llmrepro.lm import templates

    if name != "model":
        tokenizer.chat_template = templates.CHAT_TEMPLATES[name]
    elif not getattr(tokenizer, "chat_template", None):
        raise UserError(f"chat_template: model, but the tokenizer of {tokenizer.name_or_path} has none; use tulu")


def load_model_for_gradients(cfg: PairsConfig, ctx):
    """(tokenizer with the configured chat template, model in eval mode on the GPU when there is one), the EOS
    id checked when asked."""
    from llmrepro.lm.models import default_device, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    force_template(tokenizer, cfg.chat_template)
    if cfg.expect_eos_token_id is not None and tokenizer.eos_token_id != cfg.expect_eos_token_id:
        raise UserError(f"{cfg.model.name}: the tokenizer's EOS is id {tokenizer.eos_token_id} "
                        f"({tokenizer.eos_token!r}), not {cfg.expect_eos_token_id}: a different tokenizer revision?")
    model = load_model(cfg.model, ctx=ctx).eval()
    if cfg.model.device_map is None:
        model.to(default_device())
    return tokenizer, model


def method_metrics(cfg: PairsConfig, dots: DotProducts) -> dict:
    """How the full-gradient dot products were computed: the method, and with ghost the tensors done that way
    and the sample length the rule 2 T^2 <= d_in d_out used."""
    out = {"method": cfg.method}
    if cfg.method == "ghost":
        ghost = [n for n, m in dots.methods.items() if m == "ghost" and "/" not in n]
        out |= {"ghost_tensors": len(ghost), "materialized_tensors": len(dots.unlabelled().tensors) - len(ghost),
                "ghost_max_tokens": dots.max_tokens, "ghost_layers": ghost}
    return out


def compute_dot_products(cfg: PairsConfig, pairs: Pairs, ctx, projection: ProjectionConfig | None = None,
                         loaded=None, projections: dict[str, ProjectionConfig] | None = None
                         ) -> tuple[DotProducts, dict[str, int]]:
    """Stream the per-tensor dot products of cfg's partition: prompt-masked SFT loss, model in eval mode,
    optionally on per-tensor projections. Returns (dot products, nominal total dimension per projection label;
    empty without projection).

    - `projection`: the dot products of that projection only, tensors named `<label>/<tensor>` (label: the
      fraction, `1pct`; `DotProducts.part(label)` takes one out);
    - `projections` ({name: projection}): the full-gradient dot products (tensors named as the parameters) and
      those of every projection, `<name>_<label>/<tensor>`, from one gradient computation.
    `dots.methods` says how each tensor's numbers were computed (`cfg.method`: vmap, hooks -> materialized,
    ghost -> per tensor by `gradients.ghost.choose` with T the longest sample of the whole run; projections:
    factored or dense). `loaded`: (tokenizer, model) from `load_model_for_gradients`, to reuse."""
    import torch

    from llmrepro.gradients import capture, encoding, ghost, per_sample

    if projection is not None and projections:
        raise ValueError("give projection or projections, not both")
    specs = projections or ({"": projection} if projection is not None else {})
    full = projection is None
    if any(p.projector == "cuda" for p in specs.values()) and not torch.cuda.is_available():
        raise UserError("projection.projector=cuda needs a CUDA GPU; none is available (use projection.projector: "
                        "basic)")  # before loading the model
    if not full and cfg.method == "ghost":
        raise UserError("method ghost gives dot products of full gradients, not of projections; use method hooks "
                        "(or vmap) with projection")
    tokenizer, model = loaded or load_model_for_gradients(cfg, ctx)
    device = next(model.parameters()).device
    params = per_sample.select_params(model, "parameters")
    sizes = {n: p.numel() for n, p in params.items()}
    hooks = cfg.method != "vmap" or any(p.projector == "factored" for p in specs.values())
    plan = capture.capture_plan(model, params) if hooks else None
    projectors, totals, factored = {}, {}, set()  # label -> TensorProjector | FactoredProjector
    for name, spec in specs.items():
        made, nominal = spec.projector_set(sizes, cfg.seed, device, plan)
        for label, proj in made.projectors.items():
            full_label = f"{name}_{label}" if name else label
            projectors[full_label], totals[full_label] = proj, nominal[label]
            if spec.projector == "factored":
                factored.add(full_label)
            ctx.log.info("projection %s: %d dims nominal, %d over %d tensors (%s, %s projector, %s input)",
                         full_label, nominal[label], sum(proj.dims.values()), len(proj.dims), spec.type,
                         spec.projector, "factors" if spec.projector == "factored" else spec.input_dtype)
    length = cfg.max_length or sys.maxsize  # no limit: the whole sequence, as the source (no truncation)
    encoded: dict[tuple[str, int], dict] = {}

    def encode(kind: str, i: int) -> dict:
        if (kind, i) not in encoded:
            rows = pairs.variants if kind == "p" else pairs.originals
            encoded[kind, i] = encoding.encode(rows[i], "chat", tokenizer, "sft", length)
        return encoded[kind, i]

    methods = {n: "materialized" if hooks else "vmap" for n in sizes} if full else {}
    choice, longest = {}, None
    if cfg.method == "ghost":  # one choice per tensor for the whole run, from its longest sample
        used = {o for c in pairs.candidates for o in c}
        longest = max([len(encode("p", i)["input_ids"]) for i in range(len(pairs.variants))]
                      + [len(encode("o", i)["input_ids"]) for i in sorted(used)])
        choice = ghost.choose(plan, longest)
        methods = {n: "ghost" if g else "materialized" for n, g in choice.items()}
        ctx.log.info("ghost dot products for %d of %d tensors (2 T^2 <= d_in d_out, T = %d tokens)",
                     sum(choice.values()), len(choice), longest)
    for label, proj in projectors.items():
        methods |= {f"{label}/{n}": "factored" if n in getattr(proj, "factors", {}) else "dense" for n in proj.dims}

    def features(g: dict | None, captured: dict | None) -> dict:
        """What the dot products are taken of: full gradients (or their ghost factors) and projections."""
        out = {}
        if full:
            out |= ghost.features(captured, choice) if choice else g
        for label, proj in projectors.items():
            out |= {f"{label}/{n}": v for n, v in proj(captured if label in factored else g).items()}
        return out

    def grads(kind: str, idx: list[int]) -> dict[str, torch.Tensor]:
        examples = [encode(kind, i) for i in idx]
        if plan is None:
            batch = encoding.collate(examples, tokenizer.pad_token_id)
            g = per_sample.per_sample_grads(model, batch, "sft", chunk_size=cfg.batch_size)  # batch_size at a time
            return features({n: t.reshape(len(idx), -1) for n, t in g.items()}, None)
        parts = []
        for i in range(0, len(idx), cfg.batch_size):  # batch_size samples per forward and backward
            batch = encoding.collate(examples[i:i + cfg.batch_size], tokenizer.pad_token_id)
            captured = capture.capture(model, batch, "sft", plan)
            need = (full and not choice) or len(factored) < len(projectors)  # someone takes (B, n) gradients
            parts.append(features(capture.materialize_all(captured) if need else None, captured))
            del captured
        return {n: capture.PerSample.cat([p[n] for p in parts]) if isinstance(parts[0][n], capture.PerSample)
                else torch.cat([p[n] for p in parts]) for n in parts[0]}

    tensors = ({**sizes} if full else {}) | {f"{label}/{n}": k for label, proj in projectors.items()
                                             for n, k in proj.dims.items()}
    dots = stream_dot_products(grads, pairs.candidates, chunk_size=cfg.chunk_size, batch_size=cfg.batch_size,
                               start=cfg.partition_start, end=cfg.partition_end, progress=ctx.progress,
                               cross=ghost.cross, norms=ghost.norms, tensors=tensors)
    dots.methods, dots.max_tokens = methods, longest
    return dots, totals
