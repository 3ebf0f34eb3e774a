"""Measuring memory: the peak of the current process (CUDA allocator peak on a GPU, peak resident set size on
CPU), peaks that can be reset, a fresh process per measurement, and the torch profiler's memory timeline by
category (parameters, optimizer state, gradients, activations, ...).

On a GPU the peak is `torch.cuda.max_memory_allocated` (live tensor bytes). On CPU it is the peak resident
set size, which only means something in a process that did nothing else first: `in_fresh_process` runs a
function in a new interpreter with glibc's mmap threshold fixed low, so freed tensors go back to the OS
instead of staying in the heap (glibc otherwise raises the threshold after large frees and RSS overstates
live tensors), and `reset_peak` clears the kernel's high-water mark (`/proc/self/clear_refs`) so a peak
covers the measured steps only. The profiler's memory events count live tensor bytes on either device.

`peak_allocated(fn)` is the planner's measured side (its benchmark and tests): the peak of live tensor bytes
while `fn` runs, on CPU from the torch profiler's allocation events (each `[memory]` event is one c10 allocator
call, +size or -size), on CUDA from `torch.cuda.max_memory_allocated`. Unlike the resident set size it counts
tensors only, exactly: the quantity the planner predicts. Only allocations made while the profiler runs are seen
(a free of an older block reports no size), so `fn` should create what it measures: model, optimizer, batch.

    python -m llmrepro.training.memory MODULE:FUNCTION PARAMS.json RESULT.json   # what in_fresh_process runs
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from llmrepro.core.errors import UserError

MMAP_THRESHOLD = 64 * 1024  # bytes: allocations above this are mmapped, and unmapped when freed
MB = 2**20


def peak_mb() -> float:
    """torch.cuda.max_memory_allocated on a GPU; otherwise ru_maxrss (the process's peak RSS since the last
    `reset_peak`, or since start)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MB if sys.platform == "darwin" else rss / 1024


def lifetime_peaks_gib() -> dict[str, float | None]:
    """The process-lifetime CUDA peaks the memory-efficiency source printed in its timeline titles
    (`torch.cuda.max_memory_allocated` and `max_memory_reserved`, GiB, never reset); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"max_memory_allocated_gib": None, "max_memory_reserved_gib": None}
    return {"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def current_mb() -> float:
    """Memory in use now: CUDA allocated bytes on a GPU, resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / MB
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def reset_peak() -> None:
    """Start a new peak: CUDA peak stats, or on Linux the process's resident high-water mark (after handing
    freed heap memory back to the OS, so earlier garbage, e.g. a profiler's records, is not counted)."""
    import gc

    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # 5 = reset the peak RSS (Linux >= 4.0)


def in_fresh_process(target: str, params: dict, env: dict | None = None) -> dict:
    """`target(params)` ("module:function", returning a JSON-able dict) run in a new Python process, with
    `env` added to its environment (e.g. CUDA_LAUNCH_BLOCKING=1, read when CUDA starts)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="llmrepro-measure-") as tmp:
        args_path, result_path = Path(tmp, "params.json"), Path(tmp, "result.json")
        args_path.write_text(json.dumps(params))
        proc = subprocess.run([sys.executable, "-m", "llmrepro.training.memory", target, str(args_path),
                               str(result_path)], env=env, stderr=subprocess.PIPE, text=True)
        if proc.returncode == UserError.exit_code and result_path.is_file():
            raise UserError(json.loads(result_path.read_text())["user_error"])
        if proc.returncode != 0:
            raise RuntimeError(f"{target} failed in its measuring process (exit {proc.returncode}):\n"
                               + "\n".join(proc.stderr.strip().splitlines()[-20:]))
        return json.loads(result_path.read_text())


# --- the torch profiler's memory timeline ------------------------------------------------------------------

def profiler():
    """A torch profiler that records what the memory timeline needs (shapes, memory events, stacks)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True)


def start_allocator_history() -> bool:
    """Record the CUDA allocator's history from here on (after emptying its cache), as the memory-efficiency
    source's MemoryHistoryCallback did; False (nothing recorded) without CUDA: the history is CUDA-only."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(enabled="all")
    return True


def dump_allocator_history(path: Path) -> None:
    """Pickle the allocator snapshot (open it at https://pytorch.org/memory_viz) and stop recording."""
    import pickle

    import torch

    with open(path, "wb") as f:
        pickle.dump(torch.cuda.memory._snapshot(), f)
    torch.cuda.memory._record_memory_history(enabled=None)


def timeline(prof) -> tuple[list[float], dict[str, list[float]]]:
    """(times in ms from the start, {category: MB live at each time}) of a finished profile, on the device.

    Uses torch's `MemoryProfileTimeline`, the data behind `export_memory_timeline` (deprecated only for
    its CUDA-only successor, `torch.cuda.memory._record_memory_history`, which cannot see CPU tensors).
    """
    import torch
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    device_str = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device_str)
    if not times:
        return [], {}
    t0 = min(times)
    by_category = {("unknown" if c is None else c.name.lower()): [row[i + 1] / MB for row in sizes]
                   for c, i in _CATEGORY_TO_INDEX.items()}
    return [(t - t0) / 1e3 for t in times], by_category


def peak_breakdown(by_category: dict[str, list[float]]) -> dict[str, float]:
    """MB per category at the moment of the largest total, plus that total."""
    totals = [sum(col) for col in zip(*by_category.values(), strict=True)]
    if not totals:
        return {"total": 0.0}
    i = max(range(len(totals)), key=totals.__getitem__)
    return {"total": totals[i], **{c: sizes[i] for c, sizes in by_category.items()}}


def plot_timeline(times: list[float], by_category: dict[str, list[float]], path: Path, title: str) -> None:
    """Stacked area plot of live memory by category over time (the profiler's memory timeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.stackplot(times, *by_category.values(), labels=list(by_category), alpha=0.8)
    ax.set(xlabel="time (ms)", ylabel="live tensors (MB)", title=title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ live tensor bytes (the planner's check)

def cpu_events(prof) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every CPU allocation and free the profiler recorded, in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


def peak_of(events: list[tuple[int, int]]) -> int:
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_allocated(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak live tensor bytes while `fn(*args, **kwargs)` runs, its result)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    return peak_of(cpu_events(prof)), result


def _main(argv: list[str]) -> int:
    target, params_path, result_path = argv
    module, _, function = target.partition(":")
    try:
        result = getattr(importlib.import_module(module), function)(json.loads(Path(params_path).read_text()))
    except UserError as err:
        Path(result_path).write_text(json.dumps({"user_error": str(err)}))
        return err.exit_code
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
