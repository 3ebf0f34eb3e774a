"""One process per run: a lock file next to the run directory, held from claiming the run to publishing it.

Two processes that start the same run (two SLURM jobs, a resubmitted array task, a user in two terminals)
must never share or delete each other's live `.partial` directory. The lock is `filelock.FileLock` (an
`flock`, which the kernel drops when its process dies, so a lock left by a killed process is simply taken
over); the file also records its holder (pid, host, start time, command), which the refusal names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from llmrepro.core.errors import UserError

log = logging.getLogger("llmrepro")


class RunLock:
    def __init__(self, exp_dir: Path, run_id: str):
        from filelock import FileLock

        self.path = exp_dir / f".{run_id}.lock"
        self.run_id = run_id
        self._lock = FileLock(str(self.path), timeout=-1)

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, wait: bool = False) -> None:
        """Take the lock, or raise a one-line UserError naming its holder (wait=True: block until it is free)."""
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = self.holder()
            who = describe(holder)
            if not wait:
                raise UserError(f"run {self.run_id} is in use by {who}; wait for it to finish (or pass --wait)") from None
            log.warning("run %s is in use by %s: waiting for it", self.run_id, who)
            self._lock.acquire()
        previous = self.holder()
        if previous and previous.get("pid") != os.getpid():
            log.warning("took over the lock of run %s from %s, which is no longer running", self.run_id,
                        describe(previous))
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                         "argv": sys.argv}))

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            self.path.unlink()  # while still held: a waiter that then locks the unlinked file retries (filelock)
        except OSError:
            pass
        self._lock.release()


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = holder.get("started", "")
    age = ""
    try:
        seconds = time.time() - datetime.fromisoformat(since).timestamp()
        age = f", for {seconds:.0f} s"
    except ValueError:
        pass
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {since}{age})"
