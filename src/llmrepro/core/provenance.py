"""What exactly ran: code version, software stack, hardware and container, for the run manifest.

The stack record (`stack()`) names the variant (cpu | cuda), the lock file the environment was installed from, its
sha256, every pin, and the pins the environment does not satisfy (`drift`: a package installed by hand). The two
locks come from one resolution and differ only in torch's build and the CUDA libraries (CUDA_ONLY), so
`compare_stacks` can tell a researcher that two runs used the same stack, the same except torch's build, or not.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
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


# What only the CUDA lock has, plus torch itself: the packages in which the variants are allowed to differ.
CUDA_ONLY = re.compile(r"torch|triton|nvidia-.*|cuda-.*")
SOURCE_ROOT = Path(llmrepro.__file__).resolve().parents[2]  # a source checkout: requirements/ sits here


def normalise(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503's rule; `packaging` is not a declared dependency)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """{normalised name: version} of a uv / pip-compile lock file."""
    return {normalise(n): v for n, v in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.MULTILINE)}


def lock_drift(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Pins the environment does not satisfy. A pin without a local tag (PyPI's CUDA torch, `2.13.0`) matches the
    public part of the installed version (`2.13.0+cu130`)."""
    drift = []
    for name, want in sorted(pins.items()):
        got = installed.get(name)
        if got != want and not (got and "+" not in want and got.split("+")[0] == want):
            drift.append(f"{name} {got or 'missing'} (lock: {want})")
    return drift


def stack() -> dict:
    """The variant and lock this environment runs on: $LLMREPRO_VARIANT / $LLMREPRO_LOCK in an image, else the
    variant torch's build says and requirements/<variant>.lock of the source checkout."""
    import torch

    variant = os.environ.get("LLMREPRO_VARIANT") or ("cuda" if torch.version.cuda else "cpu")
    lock = Path(os.environ.get("LLMREPRO_LOCK") or SOURCE_ROOT / "requirements" / f"{variant}.lock").resolve()
    record = {"variant": variant, "torch": torch.__version__, "lock": None, "lock_sha256": None, "pins": {},
              "drift": []}
    if not lock.is_file():
        return record
    text = lock.read_text()
    installed = {normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    pins = lock_pins(text)
    shown = lock.relative_to(SOURCE_ROOT) if lock.is_relative_to(SOURCE_ROOT) else lock
    record.update(lock=str(shown), lock_sha256=io.sha256_text(text), pins=pins,
                  drift=lock_drift(pins, installed))
    return record


def compare_stacks(original: dict | None, rerun: dict | None) -> str:
    """One line: did two runs use the same software stack?"""
    if not original or not rerun or not original.get("lock_sha256") or not rerun.get("lock_sha256"):
        return "stack: not recorded for both runs (a manifest from before stack records, or no lock file found)"
    hand = [f"{which} run's environment differs from its lock in {len(s['drift'])} package(s) "
            f"({', '.join(s['drift'][:3])}{', ...' if len(s['drift']) > 3 else ''})"
            for which, s in (("the original", original), ("this", rerun)) if s.get("drift")]
    tail = f"; but {'; '.join(hand)}" if hand else ""
    if original["lock_sha256"] == rerun["lock_sha256"]:
        return f"stack: the same lock ({original['variant']}, sha256 {original['lock_sha256'][:12]}){tail}"
    a, b = original["pins"], rerun["pins"]
    differs = sorted(n for n in set(a) | set(b) if not CUDA_ONLY.fullmatch(n) and a.get(n) != b.get(n))
    if not differs:
        return (f"stack: the same pinned packages except torch's build ({original['torch']} on "
                f"{original['variant']}, {rerun['torch']} on {rerun['variant']}) and the CUDA libraries{tail}")
    shown = ", ".join(f"{n} {a.get(n) or '-'} vs {b.get(n) or '-'}" for n in differs[:5])
    return f"stack: different locks: {len(differs)} package(s) differ ({shown}{', ...' if len(differs) > 5 else ''}){tail}"


def collect() -> dict:
    """Everything the manifest records about the environment (not the config or the inputs)."""
    return {
        "llmrepro_version": llmrepro.__version__,
        "git": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "stack": stack(),
        "hardware": device_info(),
        "container_image": os.environ.get("LLMREPRO_IMAGE"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
    }

