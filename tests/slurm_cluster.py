"""The local SLURM cluster the slurm-marked tests submit to (`bash scripts/slurm-cluster.sh start`)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from llmrepro.launch import slurm

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return " is UP" in ping.stdout


cluster = pytest.mark.skipif(not cluster_up(), reason="no SLURM cluster (bash scripts/slurm-cluster.sh start)")


def wait(job_id: str, timeout: float = 400) -> set[str]:
    """The final states of a job's tasks (or of the job), once none is pending or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {j["JobState"] for j in slurm.jobs(job_id)}
        if states <= FINAL:
            return states
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {states} after {timeout} s")
