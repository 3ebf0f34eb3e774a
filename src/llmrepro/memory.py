"""Peak memory of the current process: CUDA allocator peak on a GPU, peak resident set size on CPU."""

from __future__ import annotations

import resource
import sys


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float:
    """torch.cuda.max_memory_allocated on a GPU; otherwise ru_maxrss (the process's peak RSS since start)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
