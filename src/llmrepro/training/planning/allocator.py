"""What the allocator really handed out: the peak of live tensor bytes while a function runs, on CPU from the
torch profiler's allocation events (each `[memory]` event is one c10 allocator call, +size or -size), on CUDA
from `torch.cuda.max_memory_allocated`. Unlike the resident set size, this counts tensors only, exactly, and
nothing the allocator, Python or the libraries keep besides: the quantity `measure` predicts.

Only allocations made while the profiler runs are seen (a free of an older block reports no size), so the
function should create what it measures: the model, the optimizer, the batch.
"""

from __future__ import annotations


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
