"""What exactly ran: code version, software stack, hardware and container, for the run manifest."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import llmrepro
from llmrepro.core import io

PACKAGES = ("torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate",
            "bitsandbytes", "traker", "pydantic", "wandb")


def code_version() -> dict:
    """Git commit and dirty flag; inside an image (no .git) the commit the image was built from."""
    commit, dirty = io.git_state(Path(llmrepro.__file__).resolve().parents[2])
    if commit is None:
        return {"commit": os.environ.get("LLMREPRO_GIT_COMMIT"), "dirty": None, "source": "image"}
    return {"commit": commit, "dirty": dirty, "source": "git"}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict:
    import torch

    info = {"torch_cuda": torch.version.cuda, "cudnn": None, "device": "cpu", "gpus": [], "driver": None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return info


def collect() -> dict:
    """Everything the manifest records about the environment (not the config or the inputs)."""
    return {
        "llmrepro_version": llmrepro.__version__,
        "git": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "hardware": device_info(),
        "container_image": os.environ.get("LLMREPRO_IMAGE"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
    }

