"""Progress bars on long loops: shown on a terminal, silent in logs, CI and batch jobs."""

from __future__ import annotations

import os
import sys


def enabled() -> bool:
    if os.environ.get("LLMREPRO_PROGRESS") in ("0", "1"):
        return os.environ["LLMREPRO_PROGRESS"] == "1"
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Without a terminal, the hub's, datasets' and transformers' own bars stay off too (read at their import)."""
    if not enabled():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def progress(iterable=None, **kwargs):
    """tqdm over `iterable`, disabled when stderr is not a terminal (override with LLMREPRO_PROGRESS=0|1)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
