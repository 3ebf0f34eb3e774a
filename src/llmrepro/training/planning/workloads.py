"""What an experiment runs on each device, read from its validated parameters (a plain dict: this layer imports
no recipe): the model, the step (training, gradients only, forward only), batch and sequence length, precision,
optimizer, DeepSpeed ZeRO, and which config keys change each of them (the knobs `estimate` suggests).

One extractor per recipe (WORKLOADS, name -> function); a recipe not named there but with a `model` in its
parameters is planned as a forward pass of that model, and one without a model as nothing on the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "deepspeed"
SHIPPED_DEEPSPEED = ("zero2", "zero3", "zero3_offload")


@dataclass(frozen=True)
class Zero:
    """The DeepSpeed ZeRO settings that shape memory ("auto" bucket sizes resolved from the hidden size)."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: float | str = "auto"  # elements
    prefetch_bucket: float | str = "auto"
    max_live_parameters: float = 1e9
    sub_group_size: float = 1e9
    deepspeed_optimizer: bool = False  # an `optimizer` block: DeepSpeed builds AdamW (fp32 states, partitioned)
    torch_adam: bool = False

    @classmethod
    def from_config(cls, ds: dict) -> Zero:
        z = ds.get("zero_optimization", {})
        opt = ds.get("optimizer") or {}
        return cls(stage=int(z.get("stage", 0)),
                   offload_optimizer=(z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
                   offload_param=(z.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
                   reduce_bucket=z.get("reduce_bucket_size", 5e8), prefetch_bucket=z.get("stage3_prefetch_bucket_size", 5e7),
                   max_live_parameters=float(z.get("stage3_max_live_parameters", 1e9)),
                   sub_group_size=float(z.get("sub_group_size", 1e9)), deepspeed_optimizer=bool(opt),
                   torch_adam=bool((opt.get("params") or {}).get("torch_adam", False)))


@dataclass(frozen=True)
class Workload:
    """One device's share of an experiment. `knobs`: change -> the overrides that make it (None: not possible)."""

    kind: str  # train | gradients | forward | none
    model: dict | None = None  # lm.models.ModelConfig parameters
    task: str = "causal-lm"
    batch: int = 1
    seq: int = 512
    seq_note: str = ""
    dtype: str = "float32"
    autocast: str | None = None
    optimizer: str | None = "adamw"
    optimizer_impl: str = "fused"
    step_in_backward: bool = False
    max_grad_norm: float | None = 1.0
    gradient_accumulation: int = 1
    zero: Zero | None = None  # DeepSpeed; None: plain PyTorch (DDP across devices)
    deepspeed_name: str | None = None
    memory_cap_mb: float | None = None  # the run's own memory cap (the OOM reproduction)
    knobs: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def with_(self, **kwargs) -> Workload:
        return replace(self, **kwargs)


def load_deepspeed(name: str | None) -> tuple[Zero | None, str | None]:
    """(Zero settings, display name) of a shipped DeepSpeed config name or a JSON file path."""
    if not name:
        return None, None
    path = DEEPSPEED_DIR / f"{name}.json" if name in SHIPPED_DEEPSPEED else Path(name)
    try:
        return Zero.from_config(json.loads(path.read_text())), name
    except (OSError, ValueError):
        from llmrepro.core.errors import UserError

        raise UserError(f"train.deepspeed={name}: not a shipped config ({', '.join(SHIPPED_DEEPSPEED)}) or a readable "
                        "DeepSpeed JSON file") from None


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def instruct_sft(p: dict, model_max: int) -> Workload:
    t, m = p.get("train", {}), p["model"]
    max_length = t.get("max_length") or model_max
    # the source keeps samples shorter than max_length; the longest batch is padded to a multiple of 8
    seq = _round_up(max_length - 1, t.get("pad_to_multiple_of"))
    zero, name = load_deepspeed(t.get("deepspeed"))
    half = "bfloat16" if t.get("bf16") else "float16" if t.get("fp16") else None
    dtype, autocast = (half or m.get("dtype", "float32"), None) if zero else (m.get("dtype", "float32"), half)
    lora = {"model.lora": "{r: 16, alpha: 32}"}
    return Workload(
        "train", m, batch=t.get("batch_size", 6), seq=seq,
        seq_note=f"the longest batch max_length {max_length} allows (samples < {max_length}, padded to x8)",
        dtype=dtype, autocast=autocast, optimizer="adamw",
        optimizer_impl="foreach" if zero and zero.deepspeed_optimizer else "fused",
        max_grad_norm=t.get("max_grad_norm", 1.0), gradient_accumulation=t.get("gradient_accumulation_steps", 1),
        zero=zero, deepspeed_name=name, memory_cap_mb=t.get("memory_cap_mb"),
        knobs={"checkpointing": ["model.gradient_checkpointing=true"],
               "batch": "train.batch_size={batch} train.gradient_accumulation_steps={accumulation}",
               "zero3": ["train.deepspeed=zero3"], "offload": ["train.deepspeed=zero3_offload"],
               "8bit": ["model.quantization=8bit", f"model.lora={lora['model.lora']}"],
               "4bit": ["model.quantization=4bit", f"model.lora={lora['model.lora']}"]})


def memory_efficiency(p: dict, model_max: int) -> Workload:
    t, m = p.get("train", {}), p["model"]
    mixed = t.get("mixed_precision", "no")
    return Workload(
        "train", m, batch=t.get("batch_size", 1), seq=t.get("max_length", 256),
        seq_note="max_length (samples truncated to it)", dtype=m.get("dtype", "float32"),
        autocast={"bf16": "bfloat16", "fp16": "float16"}.get(mixed), optimizer=t.get("optimizer", "adam"),
        optimizer_impl="fused" if t.get("fused_kernels") else "foreach", step_in_backward=t.get("method") == "fused",
        max_grad_norm=t.get("max_grad_norm"), gradient_accumulation=t.get("gradient_accumulation_steps", 1),
        knobs={"checkpointing": ["model.gradient_checkpointing=true"],
               "batch": "train.batch_size={batch} train.gradient_accumulation_steps={accumulation}"})


def preference(p: dict, model_max: int) -> Workload:
    t, m = p.get("train", {}), p["model"]
    seq = t.get("max_length") or p.get("max_length") or min(model_max, 1024)
    return Workload(
        "train", {**m, "gradient_checkpointing": bool(t.get("gradient_checkpointing", False))},
        batch=2 * t.get("batch_size", 1), seq=seq, seq_note="max_length; chosen and rejected in one batch",
        dtype=m.get("dtype", "float32"), autocast="bfloat16" if t.get("bf16") else None,
        notes=("the reference pass (adapter disabled, no grad) is not modelled",),
        knobs={"checkpointing": ["train.gradient_checkpointing=true"]})


def gradients(p: dict, model_max: int) -> Workload:
    m = p["model"]
    seq = p.get("max_length") or min(model_max, 4096)
    return Workload("gradients", m, task="causal-lm", batch=1, seq=seq, dtype=m.get("dtype", "float32"),
                    optimizer=None, seq_note="one sample at max_length (or the model's context)",
                    notes=("one sample's forward and backward; per-sample gradient buffers, vmap chunks and "
                           "projection matrices are not modelled",))


WORKLOADS = {
    "instruct-sft": instruct_sft,
    "memory-efficiency": memory_efficiency,
    "dpo": preference,
    "reprpo": preference,
    "extract-gradients": gradients,
    "gradient-similarity": gradients,
    "layer-dot-products": gradients,
}


def model_of(params: dict) -> dict | None:
    """The model an experiment loads onto the device, if any."""
    if isinstance(params.get("model"), dict) and params["model"].get("name"):
        return params["model"]
    local = (params.get("generator") or {}).get("local")
    if (params.get("generator") or {}).get("backend") == "local" and isinstance(local, dict):
        return local
    return None


def workload(recipe: str, params: dict, model_max: int) -> Workload:
    """The workload of `recipe` with `params`; `model_max` is the model's maximum length."""
    if recipe in WORKLOADS and model_of(params) is params.get("model"):
        return WORKLOADS[recipe](params, model_max)
    model = model_of(params)
    if model is None:
        return Workload("none", notes=("no model on the device: this recipe reads other runs' outputs",))
    batch = params.get("batch_size") or (params.get("train") or {}).get("batch_size") or 1
    seq = params.get("max_length") or min(model_max, 2048)
    return Workload("forward", model, batch=batch, seq=seq, dtype=model.get("dtype", "float32"), optimizer=None,
                    seq_note="max_length, or the model's context up to 2048",
                    notes=(f"{recipe}: planned as one forward pass without gradients (generation caches, hooks "
                           "and extra models are not modelled)",))
