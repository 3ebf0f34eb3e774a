"""Out-of-memory as a recorded outcome: run a block under a memory cap, and when an allocation fails write the
allocator's message and a memory snapshot into the run directory before the error goes on to `runs.execute`
(which then marks the run `oom` and keeps its directory).

The cap (`cap_mb`: the device memory the run may use, parameters included):
- CUDA: `torch.cuda.set_per_process_memory_fraction`, so the caching allocator raises torch.OutOfMemoryError at the
  cap as it would at the end of a smaller GPU. Snapshot: `torch.cuda.memory._dump_snapshot` (a pickle that
  https://pytorch.org/memory_viz reads; with `record=True` its allocation history too).
- CPU: the live tensor bytes, counted per op by a StepTracker (MemTracker) as the allocator hands them out; the
  op that takes them past the cap raises torch.OutOfMemoryError with the size it allocated, as CUDA's allocator
  would at that cap. (An address-space limit, RLIMIT_AS, was tried first: glibc serves requests from heap memory
  freed earlier without mapping anything, so in a long-lived process the limit never bit.) Snapshot:
  memory_snapshot.json: live tensor bytes by category at the failure and at the peak, and the largest live tensors.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from llmrepro.core import io
from llmrepro.core.runs import is_out_of_memory

MB = 2**20
SNAPSHOT = "memory_snapshot"


def requested_bytes(message: str) -> int | None:
    """The size of the allocation that failed, from the allocator's message."""
    found = re.search(r"tried to allocate (\d+(?:\.\d+)?) ?(bytes|[KMG]iB)", message)
    if not found:
        return None
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[found.group(2)]
    return int(float(found.group(1)) * scale)


def _mb(snapshot: dict) -> dict:
    return {k: round(v / MB, 3) for k, v in snapshot.items()}


def write_snapshot(run_dir: Path, err: BaseException, cap_mb: float | None, tracker=None) -> Path:
    """Write the snapshot of an out-of-memory failure into run_dir; returns the JSON summary's path."""
    import torch

    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    summary = {"message": message, "error": type(err).__name__, "requested_bytes": requested_bytes(str(err)),
               "cap_mb": cap_mb}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        pickle = run_dir / f"{SNAPSHOT}{'' if rank == 0 else f'.rank{rank}'}.pickle"
        torch.cuda.memory._dump_snapshot(str(pickle))
        stats = torch.cuda.memory_stats()
        summary |= {"device": f"cuda:{torch.cuda.current_device()}", "snapshot": pickle.name,
                    "allocated_mb": round(stats.get("allocated_bytes.all.current", 0) / MB, 3),
                    "reserved_mb": round(stats.get("reserved_bytes.all.current", 0) / MB, 3),
                    "peak_allocated_mb": round(stats.get("allocated_bytes.all.peak", 0) / MB, 3),
                    "device_total_mb": round(torch.cuda.get_device_properties(0).total_memory / MB, 3)}
    else:
        summary["device"] = "cpu"
    if tracker is not None:
        live = sorted(((w.mem_consumed, w.reftype) for w, _ in list(tracker._WINFO.values())), key=lambda x: -x[0])
        summary |= {"phase": tracker.phase(), "live_mb": _mb(tracker.current()), "peak_mb": _mb(tracker.peak()),
                    "largest_live_tensors_mb": [{"mb": round(size / MB, 3), "category": str(ref.value)}
                                                for size, ref in live[:20]]}
    path = run_dir / f"{SNAPSHOT}.json"
    io.write_json(path, summary)
    # the outcome's figures, where a finished run keeps its metrics (the run itself stays incomplete: status oom)
    requested = summary["requested_bytes"]
    before = tracker.current()["total"] - (requested or 0) if tracker is not None else None
    io.write_json(run_dir / "metrics.json", {"outcome": "oom", "cap_mb": cap_mb, "requested_bytes": requested,
                                             "allocated_bytes_before": before, "phase": summary.get("phase")})
    return path


@contextlib.contextmanager
def guard(run_dir: Path, cap_mb: float | None, model=None, *, record: bool = False, log=None):
    """Run the block under the memory cap (if any); on an out-of-memory error write the snapshot and re-raise."""
    import torch

    from llmrepro.training.planning.tracker import StepTracker

    cuda = torch.cuda.is_available()
    tracker, stack = None, contextlib.ExitStack()
    if cuda and (record or cap_mb):
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        stack.callback(torch.cuda.memory._record_memory_history, enabled=None)
    if cuda and cap_mb:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_mb * MB / total))
        stack.callback(torch.cuda.set_per_process_memory_fraction, 1.0)
    if not cuda and cap_mb:
        tracker = StepTracker(cap_bytes=int(cap_mb * MB))
        if model is not None:
            tracker.track_external(model)
        stack.enter_context(tracker)
        if log:
            log.info("memory cap %.1f MB (CPU: live tensor bytes, counted per op; %.1f MB live now)", cap_mb,
                     tracker.current()["total"] / MB)
    with stack:
        try:
            yield
        except BaseException as err:
            if not is_out_of_memory(err):
                raise
            if tracker is not None:
                tracker.cap_bytes = None  # the snapshot's own tensors must not fail
            path = write_snapshot(run_dir, err, cap_mb, tracker)
            if log:
                log.info("out of memory: %s (snapshot: %s)", str(err).strip().splitlines()[0], path.name)
            raise
