"""Peak memory per device for a workload on N devices: the measured step (measure.py) composed with what the
measurement cannot run here: DeepSpeed ZeRO's partitioning and offload, DDP's gradient buckets, bitsandbytes'
quantized weights, and the framework's own reserve.

Per device, for ZeRO stage s over N ranks, P parameters (Pt trainable), 16-bit compute weights:
    parameters   2P (s < 3), or 2P/N + the gathered working set: the largest block and the prefetch bucket (s = 3)
    gradients    as measured, full (s < 2); or 2Pt/N + the reduce buckets (s >= 2)
    optimizer    fp32 master weights 4Pt and Adam's two moments 8Pt, divided by N for s >= 1; on the host with
                 offload_optimizer
    update       at the optimizer step the fp32 gradients of the partition (4Pt/N) and, with a foreach AdamW
                 (DeepSpeed's own optimizer block with torch_adam), one temporary per sub-group
These are DeepSpeed's own accounting (`estimate_zero{2,3}_model_states_mem_needs`) plus the step's activations
and temporaries, which the estimators leave out. Without DeepSpeed the measured step is the whole story; with
several devices DDP adds its gradient buckets (a second copy of the gradients).

Reserve (GPU): CUDA context and library workspaces, 1 GiB, plus 5% of the tensor peak for the caching
allocator's fragmentation. These two constants are assumptions, not measured here (no GPU); on CPU the reserve
is 0 (the cap and the benchmark count tensors only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llmrepro.training.planning.measure import DTYPE_BYTES, Step, StepMemory, measure
from llmrepro.training.planning.workloads import Workload

GiB = 2**30
CUDA_RESERVE = 1 * GiB
FRAGMENTATION = 0.05
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}  # int8 (+ a row scale); nf4/fp4 + an fp32 absmax per 64


@dataclass
class Breakdown:
    """Bytes per device at the peak, by category, and the host memory DeepSpeed offload needs."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporary: int = 0
    reserve: int = 0
    host: int = 0
    phase: str = ""
    activations_checkpointed: int | None = None  # the activations at the peak with and without checkpointing
    activations_full: int | None = None

    @property
    def tensors(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.temporary

    @property
    def total(self) -> int:
        return self.tensors + self.reserve


@dataclass
class Estimate:
    workload: Workload
    devices: int
    device: str  # cuda | cpu
    memory: StepMemory
    breakdown: Breakdown
    notes: list[str] = field(default_factory=list)


def step_of(w: Workload, config_json: str, checkpointing: bool | None = None, batch: int | None = None,
            quantization: str | None = "keep") -> Step:
    """The Step measure() runs for workload `w` (optionally with checkpointing, batch or quantization changed)."""
    m = w.model or {}
    quant = m.get("quantization") if quantization == "keep" else quantization
    lora = m.get("lora")
    dtype = m.get("quant_compute_dtype", "bfloat16") if quant else w.dtype
    if quant and dtype == "float32":
        dtype = "bfloat16"
    lora_t = None
    if lora:
        lora_t = (lora.get("r", 16), lora.get("alpha", 8), lora.get("dropout", 0.05),
                  tuple(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])))
    optimizer = None if w.zero is not None or w.kind != "train" else w.optimizer
    return Step(config=config_json, task=w.task, mode={"forward": "forward"}.get(w.kind, "train"),
                dtype=dtype, autocast=w.autocast, lora=lora_t, kbit=bool(quant),
                checkpointing=m.get("gradient_checkpointing", False) if checkpointing is None else checkpointing,
                optimizer=optimizer, optimizer_impl=w.optimizer_impl, step_in_backward=w.step_in_backward,
                max_grad_norm=w.max_grad_norm if w.kind == "train" else None,
                batch=batch or w.batch, seq=w.seq)


def _zero_phase(phase: str, v: dict, w: Workload, mem: StepMemory, n: int, hidden: int) -> Breakdown:
    """One phase of the measured (unsharded, 16-bit, optimizer-less) step, partitioned as ZeRO does."""
    z = w.zero
    p16 = DTYPE_BYTES.get(w.dtype, 2)
    params, trainable = mem.params, mem.trainable
    reduce_bucket = hidden * hidden if z.reduce_bucket == "auto" else int(z.reduce_bucket)
    prefetch = int(0.9 * hidden * hidden) if z.prefetch_bucket == "auto" else int(z.prefetch_bucket)
    share = 1 if z.stage == 0 else n
    if z.stage == 3:
        working = min(z.max_live_parameters, max(mem.largest_block, mem.largest_module) + prefetch)
        parameters = (0 if z.offload_param else params * p16 // n) + int(working * p16)
    else:
        parameters = v["parameters"]
    if z.stage >= 2:
        gradients = trainable * p16 // n + 2 * reduce_bucket * p16  # the partition + two buckets (overlap_comm)
    else:
        gradients = v["gradients"]
    master_adam = 12 * trainable // share  # fp32 master copy + Adam m, v
    optimizer = 0 if z.offload_optimizer else master_adam
    temporary = v["temporary"] + v.get("buffers", 0) + v.get("other", 0)
    if phase == "update":
        update = 4 * trainable // share  # the fp32 gradients of the partition at the step
        if w.optimizer_impl == "foreach":
            update += 4 * int(min(trainable // share, z.sub_group_size))  # a foreach temporary per sub-group
        temporary += 0 if z.offload_optimizer else update
    host = (master_adam + 4 * trainable // share) if z.offload_optimizer else 0
    host += params * p16 // n if z.offload_param else 0
    return Breakdown(parameters, gradients, optimizer, v["activations"], temporary, host=host, phase=phase)


def _plain_phase(phase: str, v: dict) -> Breakdown:
    temporary = v["temporary"] + v.get("buffers", 0) + v.get("other", 0)
    return Breakdown(v["parameters"], v["gradients"], v["optimizer"], v["activations"], temporary, phase=phase)


def estimate(w: Workload, config_json: str, hidden: int, devices: int, device: str = "cuda") -> Estimate:
    """Peak per device of workload `w` on `devices` devices."""
    mem = measure(step_of(w, config_json))
    notes = list(w.notes)
    if w.kind == "none":
        return Estimate(w, devices, device, mem, Breakdown(), notes)
    phases = [p for p in mem.phases if p != "backward:middle"]
    if w.zero is not None:
        candidates = [_zero_phase(p, mem.phases[p], w, mem, devices, hidden) for p in phases]
        if w.zero.stage == 3 and w.zero.offload_param:
            notes.append("offload_param: parameters stream from the host; the device holds the working set only")
    else:
        candidates = [_plain_phase(p, mem.phases[p]) for p in phases]
    best = max(candidates, key=lambda b: b.tensors)
    m = w.model or {}
    if m.get("quantization"):
        compute = DTYPE_BYTES[m.get("quant_compute_dtype", "bfloat16")]
        best.parameters += int(mem.quantizable * (QUANT_BYTES[m["quantization"]] - compute))
        best.temporary += mem.largest_quantizable * compute  # one weight dequantized for its matmul
        notes.append(f"bitsandbytes {m['quantization']} is emulated: linear weights counted at "
                     f"{QUANT_BYTES[m['quantization']]:.3g} bytes each, plus one dequantized weight")
    if w.zero is None and devices > 1 and w.kind == "train":
        best.gradients += mem.trainable * DTYPE_BYTES.get(w.dtype, 4)
        notes.append("DDP across devices: its gradient buckets hold a second copy of the gradients")
    if device == "cuda":
        best.reserve = CUDA_RESERVE + int(FRAGMENTATION * best.tensors)
    _checkpointing_pair(best, w, config_json, mem)
    return Estimate(w, devices, device, mem, best, notes)


def _checkpointing_pair(best: Breakdown, w: Workload, config_json: str, mem: StepMemory) -> None:
    """The activations of the peak phase with and without gradient checkpointing (one of them is `mem`)."""
    if w.kind == "forward":
        return
    on = bool((w.model or {}).get("gradient_checkpointing", False))
    # forward and backward only: the optimizer does not change the activations
    other = measure(replace(step_of(w, config_json, checkpointing=not on), mode="gradients", optimizer=None))
    peak_other = max(other.phases.values(), key=lambda v: v["total"])
    best.activations_checkpointed, best.activations_full = (
        (best.activations, peak_other["activations"]) if on else (peak_other["activations"], best.activations))
