"""One step of a model measured without allocating: the model is built from its config under torch's
`FakeTensorMode` (tensors with shapes and dtypes but no storage) and the step runs under `StepTracker`
(MemTracker), as torchtitan's memory estimator does. The step is the real code: the transformers model's
forward and loss, autograd's backward (with activation checkpointing when asked), `clip_grad_norm_`, the torch
optimizer (fused AdamW as transformers' Trainer builds it, or foreach), LoRA through peft; only
bitsandbytes (which needs CUDA) is emulated, by the parameter sizes `estimate` substitutes.

Depth: a step's per-phase peak is affine in the number of identical decoder blocks (tracker.py), so a deep
model is measured with 2 and with 3 blocks and extrapolated (exact: `test_depth_extrapolation_is_exact`);
planning a 36-layer 12B model then takes a second or two instead of half a minute.

The step is measured in the steady state a long run sits in, with the optimizer state live through forward and
backward: an untracked optimizer step on zero gradients creates the state first (the optimizer fused into
backward creates it in its hooks, so that one runs two tracked iterations instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIN_DEPTH = 4  # models at most this deep are measured directly


@dataclass(frozen=True)
class Step:
    """What one device runs, unsharded. `config`: the model's config as JSON (sorted keys)."""

    config: str
    task: str = "causal-lm"  # causal-lm | masked-lm
    mode: str = "train"  # train | gradients (backward, no optimizer) | forward (no grad)
    dtype: str = "float32"  # the parameters' dtype during the step
    autocast: str | None = None  # bfloat16 | float16: torch.autocast around forward (mixed precision)
    checkpointing: bool = False
    lora: tuple | None = None  # (r, alpha, dropout, target modules)
    kbit: bool = False  # quantized LoRA: non-linear parameters upcast to float32, as peft's prepare_model_for_kbit_training
    optimizer: str | None = "adamw"  # adamw | adam | sgd | None
    optimizer_impl: str = "fused"  # fused | foreach
    step_in_backward: bool = False  # the optimizer step fused into backward (training.fused_optimizer)
    max_grad_norm: float | None = 1.0
    batch: int = 1
    seq: int = 512
    vocab: int | None = None  # embeddings resized to this many rows first


@dataclass
class StepMemory:
    """Bytes by category at each phase's peak, and the parameter counts of the model."""

    phases: dict[str, dict[str, int]]
    params: int
    trainable: int
    depth: int
    extrapolated: bool
    largest_block: int = 0  # parameters of the largest decoder block (ZeRO-3 gathers one at a time)
    largest_module: int = 0  # parameters of the largest leaf module (an embedding, an expert stack)
    quantizable: int = 0  # parameters bitsandbytes would quantize (linear weights but the output head)
    largest_quantizable: int = 0
    notes: list[str] = field(default_factory=list)

    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p]["total"])

    def peak(self) -> dict[str, int]:
        return self.phases[self.peak_phase()]


def step_for(config, **kwargs) -> Step:
    """A Step for a transformers config object (or dict)."""
    data = config if isinstance(config, dict) else config.to_diff_dict() | {"model_type": config.model_type}
    data = {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version", "architectures")}
    return Step(config=json.dumps(data, sort_keys=True, default=str), **kwargs)


def _config(step: Step, depth: int | None = None):
    import transformers

    data = json.loads(step.config)
    model_type = data.pop("model_type")
    data.pop("torch_dtype", None)
    data.pop("dtype", None)
    cfg = transformers.AutoConfig.for_model(model_type, **data)
    if depth is not None:
        cfg.num_hidden_layers = depth
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:depth]
    cfg.use_cache = False
    return cfg


def _build(cfg, step: Step):
    """The model as the step trains it, in `lm.models.load_model`'s order: checkpointing, then LoRA (on the meta
    device; `_materialize` then gives it fake tensors)."""
    import warnings

    import torch
    import transformers

    auto = transformers.AutoModelForMaskedLM if step.task == "masked-lm" else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices, for our own modules' sake
        model = auto.from_config(cfg, dtype=getattr(torch, _fake_dtype(step.dtype)))
        if step.vocab and step.vocab != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(step.vocab, mean_resizing=False)
        if step.checkpointing:
            model.gradient_checkpointing_enable()
    if step.lora is not None:
        from peft import LoraConfig, get_peft_model

        if step.kbit:  # what prepare_model_for_kbit_training does to what bitsandbytes leaves unquantized
            head = model.get_output_embeddings()
            for module in model.modules():
                if not isinstance(module, torch.nn.Linear) or module is head:
                    for p in module.parameters(recurse=False):
                        p.data = p.data.float()
            if step.checkpointing:
                model.enable_input_require_grads()
        r, alpha, dropout, targets = step.lora
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                 target_modules=list(targets), bias="none", task_type="CAUSAL_LM"))
    model.train()
    return model


def _fake_dtype(dtype: str | None) -> str | None:
    """float16 is measured as bfloat16: the same bytes, and CPU kernels (whose meta functions the fake step runs)
    take bfloat16 where some refuse float16 (the grouped expert matmul of Mixtral)."""
    return "bfloat16" if dtype == "float16" else dtype


def decoder_blocks(model, depth: int) -> list:
    """The decoder blocks: the largest ModuleList with `depth` entries."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def _optimizer(model, step: Step):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if step.optimizer is None or not params:
        return None
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[step.optimizer]
    impl = {"fused": True} if step.optimizer_impl == "fused" else {"foreach": True}
    if step.step_in_backward:
        from llmrepro.training.fused_optimizer import FusedOptimizer

        return FusedOptimizer(params, cls, lr=1e-4, **impl)
    # transformers' Trainer: two groups, with and without weight decay
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return cls([{"params": decay}, {"params": rest}], lr=1e-4, **impl)


def _inputs(cfg, step: Step):
    import torch

    vocab = step.vocab or cfg.vocab_size
    ids = torch.randint(0, vocab, (step.batch, step.seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_step(cfg, step: Step) -> tuple[dict[str, dict[str, int]], dict]:
    """Build the model under FakeTensorMode and run a step under StepTracker: (phase peaks, counts)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmrepro.training.planning.tracker import StepTracker

    with torch.device("meta"):
        model = _build(cfg, step)
    blocks = decoder_blocks(model, cfg.num_hidden_layers)
    counts = _counts(model, blocks)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _materialize(model)
        optimizer = _optimizer(model, step)
        iterations = 1 if step.mode != "train" or optimizer is None else 2 if step.step_in_backward else 1
        if optimizer is not None and step.mode == "train" and not step.step_in_backward:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()  # creates the state (exp_avg, exp_avg_sq, step) as the first real step would
            optimizer.zero_grad(set_to_none=True)
        batch = _inputs(cfg, step)
        tracker = StepTracker(blocks)
        tracker.track_external(model, *([optimizer] if optimizer is not None else []), *batch.values())
        autocast = (torch.autocast("cpu", dtype=getattr(torch, _fake_dtype(step.autocast))) if step.autocast
                    else contextlib.nullcontext())
        with tracker:
            for _ in range(iterations):
                tracker.stage = "forward"
                if step.mode == "forward":
                    with torch.no_grad(), autocast:
                        out = model(**{k: v for k, v in batch.items() if k != "labels"})
                    del out
                    continue
                with autocast:
                    loss = model(**batch).loss
                loss.backward()
                del loss
                if step.mode != "train" or optimizer is None:
                    model.zero_grad(set_to_none=True)
                    continue
                tracker.stage = "update"
                if step.max_grad_norm and not step.step_in_backward:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   step.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return dict(tracker.phase_peaks), counts


def _materialize(model) -> None:
    """Replace every meta parameter and buffer by an (unallocated) fake tensor, keeping tied weights tied.
    Module.to_empty cannot: it swaps tensors, which fails on fake parameters."""
    import torch

    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in done:
                    done[id(b)] = torch.empty(b.shape, dtype=b.dtype)
                module._buffers[name] = done[id(b)]


def _counts(model, blocks) -> dict:
    """Parameter counts: all, trainable, the largest decoder block and leaf module, and what bitsandbytes would
    quantize (every linear weight but the output head's and LoRA's)."""
    import torch

    head = getattr(model.get_output_embeddings(), "weight", None)
    linear = [m.weight.numel() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m.weight is not head and "lora_" not in name]
    leaves = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "largest_block": max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
            "largest_module": max(leaves, default=0),
            "quantizable": sum(linear), "largest_quantizable": max(linear, default=0)}


def _homogeneous(cfg, step: Step) -> bool:
    """Whether every decoder block has the same parameter shapes (then depth extrapolation is exact)."""
    import torch

    with torch.device("meta"):
        model = _build(cfg, Step(**{**step.__dict__, "lora": None, "checkpointing": False}))
    blocks = decoder_blocks(model, cfg.num_hidden_layers)
    shapes = [[(n, tuple(p.shape), p.dtype) for n, p in b.named_parameters()] for b in blocks]
    return bool(blocks) and all(s == shapes[0] for s in shapes)


CACHE_VERSION = 1  # bump when what a step measures changes


def _cache_path(step: Step):
    """Where a measured step is kept between processes: keyed by the step and the library versions it ran."""
    from importlib.metadata import version

    from llmrepro.core import io

    libraries = [version(name) for name in ("torch", "transformers", "peft")]
    key = json.dumps([CACHE_VERSION, libraries, step.__dict__], sort_keys=True)
    return io.cache_dir() / "planner" / f"{io.sha256_text(key)[:24]}.json"


@functools.lru_cache(maxsize=256)
def measure(step: Step) -> StepMemory:
    """Peak bytes per phase of `step` (extrapolated in depth for deep homogeneous models) and parameter counts;
    cached in memory and on disk."""
    from llmrepro.core import io

    path = _cache_path(step)
    if path.is_file():
        return StepMemory(**io.read_json(path))
    result = _measure(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(path, dataclasses.asdict(result))
    return result


def _measure(step: Step) -> StepMemory:
    from llmrepro.training.planning.tracker import PHASES

    cfg = _config(step)
    depth = cfg.num_hidden_layers
    if depth <= MIN_DEPTH or not _homogeneous(cfg, step):
        phases, counts = run_step(cfg, step)
        return StepMemory(phases, depth=depth, extrapolated=False, **counts)
    (two, c2), (three, c3) = run_step(_config(step, 2), step), run_step(_config(step, 3), step)

    def extend(a: int, b: int) -> int:
        return a + (depth - 2) * (b - a)

    phases = {p: {k: extend(two[p][k], three[p][k]) for k in two[p]}
              for p in PHASES if p in two and p in three and p != "backward:middle"}
    counts = {k: extend(c2[k], c3[k]) if k in ("params", "trainable", "quantizable") else c3[k] for k in c3}
    return StepMemory(phases, depth=depth, extrapolated=True, **counts)


def counts_on_meta(step: Step) -> dict:
    """Parameter counts of the full-depth model, built on the meta device (no fake step)."""
    import torch

    cfg = _config(step)
    with torch.device("meta"):
        model = _build(cfg, step)
    return _counts(model, decoder_blocks(model, cfg.num_hidden_layers))
