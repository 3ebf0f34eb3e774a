"""`llmrepro plan`: an experiment's peak memory per device, a verdict against the devices it would get, and the
smallest change that fits. Offline: the model's config comes from the tiny-model cache, a local checkpoint, the
Hugging Face cache, or the shipped table of the catalog's hub models (architectures.json); no weights are read.

Devices: `gpus` GPUs of `gpu_mem_gib` each (default: the experiment's resources, 80 GiB), or, with no GPUs (a
smoke profile, `--gpus 0`), the CPU with this machine's memory. A run's own memory cap
(`train.memory_cap_mb`, the OOM reproduction) replaces the device memory when smaller.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmrepro.core.errors import UserError
from llmrepro.training.planning import estimate as est
from llmrepro.training.planning.estimate import Estimate, GiB
from llmrepro.training.planning.workloads import Workload, model_of, workload

ARCHITECTURES = Path(__file__).with_name("architectures.json")
LENGTH_SETTINGS = ("n_positions", "max_position_embeddings", "seq_length")  # as instruct-sft's max length
DEFAULT_GPU_MEM_GIB = 80.0
MAX_GPUS = 64


@dataclass
class Suggestion:
    change: str  # what to pass: overrides and/or --gpus N
    total: int  # bytes per device with the change


@dataclass
class Plan:
    experiment: str
    profile: str | None
    estimate: Estimate
    available: int  # bytes per device
    model_source: str
    suggestions: list[Suggestion] = field(default_factory=list)
    alternatives: list[Suggestion] = field(default_factory=list)

    @property
    def unit(self) -> tuple[str, int]:
        return ("MiB", 2**20) if self.available < 8 * GiB else ("GiB", GiB)

    def fmt(self, n: int | None) -> str:
        name, scale = self.unit
        return "-" if n is None else _num(n / scale)

    @property
    def fits(self) -> bool:
        return self.estimate.breakdown.total <= self.available

    @property
    def margin(self) -> int:
        return self.available - self.estimate.breakdown.total

    def devices_text(self) -> str:
        e = self.estimate
        what = "GPU" if e.device == "cuda" else "CPU"
        return f"{e.devices} x {what} of {self.fmt(self.available)} {self.unit[0]}" if e.device == "cuda" else \
            f"{what} with {self.fmt(self.available)} {self.unit[0]}"

    def verdict(self) -> str:
        total = self.estimate.breakdown.total
        u = self.unit[0]
        if self.fits:
            return (f"fits: {self.fmt(total)} of {self.fmt(self.available)} {u} per device (margin "
                    f"{self.fmt(self.margin)} {u}, {100 * self.margin / self.available:.0f}%)")
        return (f"OOM: needs {self.fmt(total)} of {self.fmt(self.available)} {u} per device (short by "
                f"{self.fmt(-self.margin)} {u})")

    def line(self) -> str:
        """The verdict in one line (what `invoke slurm` prints when it refuses a job)."""
        fix = f"; smallest change that fits: {self.suggestions[0].change}" if self.suggestions else ""
        fix = fix if self.fits or self.suggestions else "; no single change found that fits"
        return f"plan {self.experiment} on {self.devices_text()}: {self.verdict()}{'' if self.fits else fix}"


def _num(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def model_config(model: dict) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for a model config, offline."""
    from llmrepro.lm import builtin, tiny

    name = model["name"]
    table = json.loads(ARCHITECTURES.read_text())
    if tiny.is_tiny(name):
        path = tiny.ensure(name, model.get("tiny_config") or {})
        return json.loads((path / "config.json").read_text()), "tiny model"
    if builtin.is_builtin(name) and name in table:
        return dict(table[name]), "shipped architecture table"
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text()), f"{local}/config.json"
    cached = _hf_cached_config(name, model.get("revision"))
    if cached is not None:
        return cached, "Hugging Face cache"
    if name in table:
        return dict(table[name]), "shipped architecture table"
    raise UserError(f"plan: no config for model '{name}' offline: download it once "
                    f"(huggingface-cli download {name} config.json) or add it to {ARCHITECTURES.name}")


def _hf_cached_config(name: str, revision: str | None) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    except Exception:  # an invalid repo id, no cache: not an error here
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) and os.path.isfile(path) else None


def max_length_of(config: dict) -> int:
    for key in LENGTH_SETTINGS:
        if config.get(key):
            return int(config[key])
    return 1024


def host_memory() -> int:
    """This machine's memory (bytes), from /proc/meminfo (or sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _config_json(config: dict) -> str:
    keep = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "architectures",
                                                          "auto_map")}
    return json.dumps(keep, sort_keys=True, default=str)


def plan_params(experiment: str, recipe: str, params: dict, profile: str | None, resources, gpus: int | None = None,
                gpu_mem_gib: float | None = None, search: bool = True, available: int | None = None) -> Plan:
    """The plan of a recipe's validated parameters on the given (or the experiment's) devices; `available`
    replaces the device memory (a CPU job's share of its allocation)."""
    model = model_of(params)
    config, source = model_config(model) if model else ({}, "no model")
    w = workload(recipe, params, max_length_of(config))
    if gpus is None:
        gpus = 0 if profile == "smoke" else resources.nodes * resources.gpus_per_node
    device = "cuda" if gpus > 0 else "cpu"
    if available is None:
        available = int((gpu_mem_gib or DEFAULT_GPU_MEM_GIB) * GiB) if device == "cuda" else host_memory()
    if w.memory_cap_mb:
        available = min(available, int(w.memory_cap_mb * 2**20))
    cfg_json = _config_json(config) if model else "{}"
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    e = est.estimate(w, cfg_json, hidden, max(gpus, 1), device) if model else \
        Estimate(w, max(gpus, 1), device, None, est.Breakdown(), list(w.notes))
    result = Plan(experiment, profile, e, available, source)
    if model and search and not result.fits:
        result.suggestions, result.alternatives = suggest(w, cfg_json, hidden, max(gpus, 1), device, available)
    return result


def plan(experiment: str, profile: str | None = None, overrides: list[str] = (), gpus: int | None = None,
         gpu_mem_gib: float | None = None) -> Plan:
    """The plan of a catalog experiment (as `llmrepro run` would run it)."""
    from llmrepro.core import catalog

    exp = catalog.load(experiment)
    spec = exp.run_spec(profile, list(overrides))
    if gpus is not None and gpus < 0:
        raise UserError(f"--gpus {gpus}: give 0 (CPU) or more")
    if gpu_mem_gib is not None and gpu_mem_gib <= 0:
        raise UserError(f"--gpu-mem {gpu_mem_gib}: give the memory per GPU in GiB, e.g. 80")
    return plan_params(experiment, spec.recipe, spec.params, profile, exp.spec.resources, gpus, gpu_mem_gib)


# --- the smallest change that fits ---------------------------------------------------------------------------

def _variants(w: Workload, devices: int, cuda: bool = True, targets: tuple = ()):
    """(change, workload, devices) candidates, each one change, least disruptive first. `targets`: the LoRA target
    modules a quantization suggestion adds (peft's defaults for the architecture)."""
    m = w.model or {}
    if not m.get("gradient_checkpointing") and "checkpointing" in w.knobs and w.kind == "train":
        yield " ".join(w.knobs["checkpointing"]), w.with_(model={**m, "gradient_checkpointing": True}), devices
    if "batch" in w.knobs and w.batch > 1:
        batch, accumulation = w.batch, w.gradient_accumulation
        while batch > 1:
            batch, accumulation = max(1, batch // 2), accumulation * 2
            yield (w.knobs["batch"].format(batch=batch, accumulation=accumulation),
                   w.with_(batch=batch, gradient_accumulation=accumulation), devices)
    from llmrepro.training.planning.workloads import load_deepspeed

    if "zero3" in w.knobs and (w.zero is None or w.zero.stage < 3) and devices > 1:
        zero, name = load_deepspeed("zero3")
        yield " ".join(w.knobs["zero3"]), _as_deepspeed(w, zero, name), devices
    if "offload" in w.knobs and not (w.zero and w.zero.offload_optimizer):
        zero, name = load_deepspeed("zero3_offload")
        yield " ".join(w.knobs["offload"]), _as_deepspeed(w, zero, name), devices
    if w.zero is not None and w.zero.stage >= 1:
        n = devices * 2
        while n <= MAX_GPUS:
            yield f"--gpus {n}", w, n
            n *= 2
    for quant in ("8bit", "4bit"):
        if quant in w.knobs and not m.get("quantization") and w.zero is None and w.kind == "train" and cuda:
            lora = m.get("lora") or {"r": 16, "alpha": 32, "target_modules": targets}
            overrides = [f"model.quantization={quant}"] + ([] if m.get("lora") else [
                "model.lora={r: 16, alpha: 32, target_modules: [" + ", ".join(targets) + "]}"])
            yield " ".join(overrides), w.with_(model={**m, "quantization": quant, "lora": lora}), devices


def _as_deepspeed(w: Workload, zero, name) -> Workload:
    """The workload trained under a shipped DeepSpeed config: a 16-bit module, DeepSpeed's optimizer."""
    dtype = w.autocast or ("bfloat16" if w.dtype == "float32" else w.dtype)
    return w.with_(zero=zero, deepspeed_name=name, dtype=dtype, autocast=None, optimizer_impl="foreach")


def lora_targets(config_json: str) -> tuple:
    """peft's default LoRA target modules for the architecture (what `target_modules: None` picks)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return tuple(DEFAULTS.get(json.loads(config_json).get("model_type"), None) or ("q_proj", "v_proj"))


def _total(variant: Workload, cfg_json: str, hidden: int, n: int, device: str) -> int | None:
    try:
        return est.estimate(variant, cfg_json, hidden, n, device).breakdown.total
    except Exception as err:  # a change this model cannot take (e.g. LoRA targets it lacks) is no suggestion
        logging.getLogger("llmrepro").debug("plan: candidate not estimated: %s", err)
        return None


def suggest(w: Workload, cfg_json: str, hidden: int, devices: int, device: str, available: int):
    """(the first single change that fits, and the other single changes that fit), else ([cumulative], [])."""
    options = {"cuda": device == "cuda", "targets": lora_targets(cfg_json)}
    fitting = []
    for change, variant, n in _variants(w, devices, **options):
        total = _total(variant, cfg_json, hidden, n, device)
        if total is not None and total <= available:
            fitting.append(Suggestion(change, total))
    if fitting:
        return fitting[:1], fitting[1:4]
    # no single change: apply them one after another, in the same order, until it fits
    changes, current, n = [], w, devices
    for change, variant, m in _variants(w, devices, **options):
        if change.startswith("--gpus"):
            candidate, m_ = current, m
        else:
            candidate, m_ = _merge(current, variant), n
        total = _total(candidate, cfg_json, hidden, m_, device)
        if total is None:
            continue
        changes.append(change)
        current, n = candidate, m_
        if total <= available:
            return [Suggestion(" ".join(changes), total)], []
    return [], []


def _merge(current: Workload, variant: Workload) -> Workload:
    """`current` with what `variant` changed relative to its own base (one knob at a time)."""
    model = {**(current.model or {}), **{k: v for k, v in (variant.model or {}).items()
                                          if k in ("gradient_checkpointing", "quantization", "lora")}}
    return current.with_(model=model, batch=min(current.batch, variant.batch),
                         gradient_accumulation=max(current.gradient_accumulation, variant.gradient_accumulation),
                         zero=variant.zero or current.zero, deepspeed_name=variant.deepspeed_name or current.deepspeed_name,
                         dtype=variant.dtype if variant.zero else current.dtype,
                         autocast=None if variant.zero else current.autocast,
                         optimizer_impl=variant.optimizer_impl)


# --- the report ------------------------------------------------------------------------------------------------

def describe(p: Plan) -> list[str]:
    e, w = p.estimate, p.estimate.workload
    m = w.model or {}
    lines = [f"plan {p.experiment} ({p.profile or 'default'} profile)"]
    if w.kind == "none":
        return [*lines, f"  {w.notes[0]}", f"verdict: fits: nothing of the run's own on the device ({p.devices_text()})"]
    mem = e.memory
    what = {"train": "training step", "gradients": "forward and backward (no optimizer)",
            "forward": "forward pass (no gradients)"}[w.kind]
    method = ("LoRA" + (f" on a {m['quantization']} base" if m.get("quantization") else "")) if m.get("lora") else \
        "full fine-tuning" if w.kind == "train" else ""
    precision = (f"{w.dtype} module, fp32 master weights (DeepSpeed {w.deepspeed_name}: ZeRO-{w.zero.stage}"
                 f"{', optimizer offload' if w.zero.offload_optimizer else ''}"
                 f"{', parameter offload' if w.zero.offload_param else ''})" if w.zero else
                 f"{w.dtype} weights" + (f", {w.autocast} autocast" if w.autocast else ""))
    opt = "" if w.kind != "train" else f", {w.optimizer} ({'fused into backward' if w.step_in_backward else w.optimizer_impl})"
    size = f"{mem.params / 1e9:.3g}B" if mem.params >= 1e9 else f"{mem.params / 1e6:.3g}M"
    trained = f"{mem.trainable / 1e9:.3g}B" if mem.trainable >= 1e9 else f"{mem.trainable / 1e6:.3g}M"
    lines += [f"  model      {m['name']}: {size} parameters ({trained} trained; config: {p.model_source})",
              f"  step       {what}{', ' + method if method else ''}: batch {w.batch} x {w.seq} tokens per device "
              f"({w.seq_note}), gradient checkpointing {'on' if m.get('gradient_checkpointing') else 'off'}",
              f"  precision  {precision}{opt}",
              f"  devices    {p.devices_text()}" + (f" (the run's memory cap {w.memory_cap_mb:g} MB)" if w.memory_cap_mb
                                                     else "")]
    b = e.breakdown
    rows = [("parameters", b.parameters, ""), ("gradients", b.gradients, ""),
            ("optimizer states", b.optimizer, "fp32 master + Adam moments" if w.zero else ""),
            ("activations", b.activations,
             f"checkpointing on: {p.fmt(b.activations_checkpointed)}, off: {p.fmt(b.activations_full)} {p.unit[0]}"
             if b.activations_full is not None else ""),
            ("temporary buffers", b.temporary, ""), ("framework reserve", b.reserve,
                                                      "CUDA context, workspaces, fragmentation" if b.reserve else "")]
    lines += ["", f"  {'per device':<20}{p.unit[0]:>9}"]
    lines += [f"  {name:<20}{p.fmt(value):>9}   {note}".rstrip() for name, value, note in rows]
    lines += [f"  {'peak':<20}{p.fmt(b.total):>9}   during {b.phase}"
              + (" (depth-extrapolated from 2 and 3 blocks)" if mem.extrapolated else "")]
    if b.host:
        lines += [f"  {'host per device':<20}{p.fmt(b.host):>9}   offloaded optimizer state"]
    lines += [f"  note: {n}" for n in e.notes]
    lines += ["", f"verdict: {p.verdict()}"]
    if not p.fits:
        if p.suggestions:
            s = p.suggestions[0]
            lines += [f"smallest change that fits: {s.change} ({p.fmt(s.total)} {p.unit[0]} per device)"]
            lines += [f"  also fits: {a.change} ({p.fmt(a.total)} {p.unit[0]})" for a in p.alternatives]
        else:
            lines += ["no change found that fits (checkpointing, batch, ZeRO-3, offload, more GPUs, quantization)"]
    return lines


def render(p: Plan) -> str:
    return "\n".join(describe(p))


# --- before a cluster job is queued ----------------------------------------------------------------------------

def slurm_memory(mem: str) -> int:
    """Bytes of a SLURM --mem value (a number with K, M, G or T; M without one)."""
    value = mem.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if value and value[-1] in scale:
        return int(float(value[:-1]) * scale[value[-1]])
    return int(float(value) * 2**20)


def preflight(experiment: str, profile: str | None, overrides: list[str], *, nodes: int, gpus_per_node: int,
              procs_per_node: int, mem: str, gpu_mem_gib: float | None = None) -> Plan:
    """The plan of a job as `invoke slurm` would submit it: nodes x GPUs of `gpu_mem_gib`, or on CPU each of the
    node's processes with its share of the job's --mem."""
    from llmrepro.core import catalog

    exp = catalog.load(experiment)
    spec = exp.run_spec(profile, list(overrides))
    gpus = nodes * gpus_per_node
    share = None if gpus else slurm_memory(mem) // max(procs_per_node, 1)
    return plan_params(experiment, spec.recipe, spec.params, profile, exp.spec.resources, gpus=gpus,
                       gpu_mem_gib=gpu_mem_gib, available=share)
