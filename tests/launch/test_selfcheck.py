"""docker/selfcheck.py's parts that need no image: the fatbin reader (against the GPU architectures cuobjdump lists
for bitsandbytes' locked binaries) and the lock-pin comparison. The whole check runs in both image builds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("selfcheck", ROOT / "docker/selfcheck.py")
selfcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(selfcheck)
BNB = Path(importlib.util.find_spec("bitsandbytes").origin).parent

# `cuobjdump --list-elf` on bitsandbytes 0.50.2's libraries (nvidia-cuda-cuobjdump 13.5.37): cubins only, no PTX.
CUOBJDUMP = {
    "libbitsandbytes_cuda130.so": ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"],
    "libbitsandbytes_cuda128.so": ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"],
    "libbitsandbytes_cuda126.so": ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"],
}


@pytest.mark.parametrize("lib", sorted(CUOBJDUMP))
def test_fatbin_arches_match_cuobjdump(lib):
    assert selfcheck.fatbin_arches(BNB / lib) == CUOBJDUMP[lib]


def test_fatbin_arches_of_a_library_without_gpu_code_and_of_a_non_elf(tmp_path):
    assert selfcheck.fatbin_arches(BNB / "libbitsandbytes_cpu.so") == []
    (tmp_path / "x.so").write_bytes(b"not an ELF file")
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        selfcheck.fatbin_arches(tmp_path / "x.so")


def test_bitsandbytes_coverage_check():
    assert selfcheck.check_bitsandbytes("13.0", ["sm_80", "sm_90"]) == []
    assert selfcheck.check_bitsandbytes("13.0", ["sm_70", "sm_80"]) == ["libbitsandbytes_cuda130.so lacks sm_70"]
    assert selfcheck.check_bitsandbytes("11.1", ["sm_80"]) == ["bitsandbytes has no libbitsandbytes_cuda111.so "
                                                               "for torch's CUDA 11.1"]


def test_lock_pins_and_drift():
    text = "# header\nTorch==2.13.0 \\\n    --hash=sha256:00\n    # via x\nrank_bm25==0.2.2\n"
    pins = selfcheck.lock_pins(text)
    assert pins == {"torch": "2.13.0", "rank-bm25": "0.2.2"}
    assert selfcheck.lock_drift(pins, {"torch": "2.13.0+cu130", "rank-bm25": "0.2.2"}) == []
    assert selfcheck.lock_drift(pins, {"torch": "2.13.0+cu130"}) == ["rank-bm25 missing, lock pins 0.2.2"]

