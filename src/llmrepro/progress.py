"""Progress bars on long loops: shown on a terminal, silent in logs, CI and batch jobs."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def enabled() -> bool:
    if os.environ.get("LLMREPRO_PROGRESS") in ("0", "1"):
        return os.environ["LLMREPRO_PROGRESS"] == "1"
    return sys.stderr.isatty()


def progress(iterable=None, **kwargs):
    """tqdm over `iterable`, disabled when stderr is not a terminal (override with LLMREPRO_PROGRESS=0|1)."""
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
