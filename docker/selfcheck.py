"""Fail the image build when the installed stack is not what the lock file pins.

    python docker/selfcheck.py requirements/cpu.lock                # CPU: torch has no CUDA
    python docker/selfcheck.py requirements/cuda.lock --cuda 13.0 --arch "sm_75 sm_80"

Checks the torch version against the lock's pin, the CUDA version and the compiled
GPU architectures (read from the build, so no GPU is needed), and that every library
the recipes use imports. Run by the Dockerfile at build time and by CI in the built image.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

MODULES = ["transformers", "peft", "trl", "datasets", "bitsandbytes", "trak", "wandb", "invoke"]


def locked_version(lock_text: str, package: str) -> str:
    """The `package==VERSION` pin of a pip-compile / uv lock file."""
    match = re.search(rf"^{re.escape(package)}==(\S+)", lock_text, flags=re.MULTILINE)
    if not match:
        raise SystemExit(f"selfcheck: {package} is not pinned in the lock file")
    return match.group(1)


def check(lock: str, cuda: str | None, arch: str | None) -> list[str]:
    """Every mismatch between the environment and what was asked for, as messages."""
    import torch

    problems = []
    with open(lock) as f:
        want = locked_version(f.read(), "torch")
    # PyPI's CUDA wheel is pinned as 2.13.0 but reports 2.13.0+cu130: compare the public part when the pin has none.
    have = torch.__version__ if "+" in want else torch.__version__.split("+")[0]
    if have != want:
        problems.append(f"torch {torch.__version__}, lock pins {want}")
    if torch.version.cuda != cuda:
        problems.append(f"torch built for CUDA {torch.version.cuda}, expected {cuda}")
    if arch is not None:
        built = torch._C._cuda_getArchFlags() or ""
        if built.split() != arch.split():
            problems.append(f"torch compiled for '{built}', expected '{arch}'")
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure to import is a broken image
            problems.append(f"import {name}: {type(e).__name__}: {e}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", help="the lock file the image was installed from")
    parser.add_argument("--cuda", help="expected torch.version.cuda (omit for a CPU build)")
    parser.add_argument("--arch", help="expected compiled arch list, e.g. 'sm_80 sm_90'")
    args = parser.parse_args()
    problems = check(args.lock, args.cuda or None, args.arch or None)
    for problem in problems:
        print(f"selfcheck: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    import torch

    print(f"selfcheck: ok (torch {torch.__version__}, CUDA {torch.version.cuda}, {len(MODULES)} imports)")


if __name__ == "__main__":
    main()
