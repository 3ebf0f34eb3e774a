"""Where log records go: llmrepro's own warnings to the terminal, everything to the run's `run.log`.

Third-party libraries log at import and while they work (bitsandbytes' CPU backend on AVX512-BF16
machines, transformers' `mean_resizing` note, datasets' parse failures, deprecation warnings): none of it
reaches the terminal unless `-v` is given, and all of it reaches the run log of the run it happened in.
Records that arrive before a run has a log (imports, config checks) are kept and written into the next
run log that opens. Python `warnings` are routed through logging (`py.warnings`) the same way.

transformers and datasets install their own stderr handlers at import; `adopt_library_loggers` takes
those out and lets their records propagate here instead (called when a run starts, and after an import of
such a library, e.g. DeepSpeed, that a recipe makes itself).
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler

OURS = "llmrepro"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "DeepSpeed", "deepspeed", "accelerate", "trl", "peft")

_pending: MemoryHandler | None = None


class _OursOnly(logging.Filter):
    """The terminal shows llmrepro's records only (at WARNING and up unless verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == OURS or record.name.startswith(OURS + ".")


def setup(verbose: bool = False) -> None:
    """Install the terminal handler and the pending buffer; idempotent. Call before importing libraries."""
    global _pending
    root = logging.getLogger()
    if any(getattr(h, "_llmrepro", False) for h in root.handlers):
        return
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(_OursOnly())
    console._llmrepro = True
    _pending = MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    _pending.setLevel(logging.INFO)
    _pending._llmrepro = True
    root.addHandler(console)
    root.addHandler(_pending)
    root.setLevel(logging.INFO)
    logging.getLogger(OURS).setLevel(logging.INFO)
    logging.captureWarnings(True)


def attach_run_log(path) -> logging.Handler:
    """A file handler for a run's `run.log`, first filled with the records that were waiting for one."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    if _pending is not None:
        for record in _pending.buffer:
            handler.handle(record)
        _pending.buffer.clear()
    if logging.getLogger(OURS).getEffectiveLevel() > logging.INFO:  # the run log always has the run's own messages
        logging.getLogger(OURS).setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def adopt_library_loggers() -> None:
    """Take out the terminal handlers that imported libraries put on their loggers; let their records propagate
    to ours. transformers is imported here (every run uses it, and its handler comes with its first logger)."""
    import transformers.utils.logging as tlog

    from llmrepro.core.progress import enabled

    tlog.disable_default_handler()
    tlog.enable_propagation()
    if not enabled():  # transformers reads the hub's setting once, at its import, which may precede ours
        tlog.disable_progress_bar()
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:  # a console handler (FileHandler is a subclass: kept)
                logger.removeHandler(h)
        logger.propagate = True
