"""Fail the image build when the installed stack is not what the lock file pins.

    python docker/selfcheck.py requirements/cpu.lock                # CPU: torch has no CUDA
    python docker/selfcheck.py requirements/cuda.lock --cuda 13.0 --arch "sm_75 sm_80"

Checks, with no GPU needed (the GPU code is read from the libraries' ELF files):
- every package the lock pins is installed at the pinned version (torch's local build tag aside, see below);
- torch's CUDA version and compiled GPU architectures;
- with --cuda: fast_jl (traker's CUDA projector) imports and holds kernels for exactly those architectures, and
  bitsandbytes carries the binary for torch's CUDA version, covering them;
- every library the recipes use imports.
Prints the NVIDIA driver the host needs. Run by the Dockerfile at build time and by CI in the built image.
Standard library plus torch only: it runs before llmrepro is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import struct
import sys
from pathlib import Path

MODULES = ["transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "trak", "deepspeed", "sklearn",
           "rank_bm25", "gguf", "scipy", "matplotlib", "wandb", "invoke"]
# The oldest driver branch of each CUDA major version (CUDA's minor-version compatibility).
DRIVER_FOR_CUDA = {"12": "525", "13": "580"}


def lock_pins(lock_text: str) -> dict[str, str]:
    """{normalised name: version} of a pip-compile / uv lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock_text, flags=re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def installed() -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in importlib.metadata.distributions()}


def lock_drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """Pins the environment does not satisfy. PyPI's CUDA torch is pinned as 2.13.0 and reports 2.13.0+cu130:
    a pin without a local tag matches the public part of the installed version."""
    drift = []
    for name, want in sorted(pins.items()):
        got = have.get(name)
        if got is not None and "+" not in want:
            got = got.split("+")[0]
        if got != want:
            drift.append(f"{name} {have.get(name) or 'missing'}, lock pins {want}")
    return drift


def fatbin_arches(path: str | Path) -> list[str]:
    """The GPU code in a shared library's `.nv_fatbin` ELF section: `sm_XX` per cubin, `compute_XX` per PTX,
    sorted and without repeats. Written by hand because no CUDA tool (cuobjdump) is in the image: the fatbin
    container is a run of headers (magic 0xBA55ED50, header size, payload size), each holding entries whose
    header gives the kind (1 PTX, 2 cubin) and, at offset 28, the architecture (80 for sm_80)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]  # the section-name string table's file offset

    def name(h) -> str:
        start = names_at + h[0]
        return data[start:data.index(b"\0", start)].decode()

    found = set()
    for h in headers:
        if name(h) != ".nv_fatbin":
            continue
        blob, pos = data[h[4]:h[4] + h[5]], 0
        while pos + 16 <= len(blob):
            magic, _version, header_size, payload = struct.unpack_from("<IHHQ", blob, pos)
            if magic != 0xBA55ED50:
                pos += 8  # alignment padding between containers
                continue
            entry, end = pos + header_size, pos + header_size + payload
            while entry < end:
                kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, entry)
                arch, = struct.unpack_from("<I", blob, entry + 28)
                found.add((arch, {1: "compute", 2: "sm"}.get(kind, f"kind{kind}")))
                entry += entry_header + entry_size
            pos = end
    return [f"{kind}_{arch}" for arch, kind in sorted(found)]


def check_fast_jl(arch: list[str]) -> list[str]:
    try:
        import fast_jl  # after torch (it links libc10 and has no RPATH)
    except Exception as e:
        return [f"import fast_jl: {type(e).__name__}: {e}"]
    problems = [] if hasattr(fast_jl, "project_rademacher_8") else ["fast_jl has no project_rademacher_8 kernel"]
    built = fatbin_arches(fast_jl.__file__)
    if built != arch:
        problems.append(f"fast_jl compiled for '{' '.join(built)}', expected '{' '.join(arch)}'")
    return problems


def bitsandbytes_library(cuda: str) -> Path:
    spec = importlib.util.find_spec("bitsandbytes")
    return Path(spec.origin).parent / f"libbitsandbytes_cuda{cuda.replace('.', '')}.so"


def check_bitsandbytes(cuda: str, arch: list[str]) -> list[str]:
    lib = bitsandbytes_library(cuda)
    if not lib.is_file():
        return [f"bitsandbytes has no {lib.name} for torch's CUDA {cuda}"]
    missing = sorted(set(arch) - set(fatbin_arches(lib)), key=lambda a: int(a.split("_")[1]))
    return [f"{lib.name} lacks {' '.join(missing)}"] if missing else []


def check(lock: str, cuda: str | None, arch: str | None) -> list[str]:
    """Every mismatch between the environment and what was asked for, as messages."""
    import torch

    problems = lock_drift(lock_pins(Path(lock).read_text()), installed())
    if torch.version.cuda != cuda:
        problems.append(f"torch built for CUDA {torch.version.cuda}, expected {cuda}")
    arches = arch.split() if arch else None
    if arches is not None:
        built = torch._C._cuda_getArchFlags() or ""
        if built.split() != arches:
            problems.append(f"torch compiled for '{built}', expected '{arch}'")
    if cuda and arches:
        problems += check_fast_jl(arches) + check_bitsandbytes(cuda, arches)
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

    pinned = len(lock_pins(Path(args.lock).read_text()))
    print(f"selfcheck: ok: {pinned} packages as locked, torch {torch.__version__}, {len(MODULES)} imports")
    if args.cuda:
        print(f"selfcheck: GPU code for {args.arch} in torch, fast_jl and {bitsandbytes_library(args.cuda).name}")
        driver = DRIVER_FOR_CUDA.get(args.cuda.split(".")[0], "?")
        print(f"selfcheck: the host needs an NVIDIA driver >= {driver} (CUDA {args.cuda}); the image has none")


if __name__ == "__main__":
    main()
