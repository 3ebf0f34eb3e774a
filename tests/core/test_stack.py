"""The manifest's stack record (variant, lock, its hash, pins, drift) and `compare_stacks`, the line `reproduce`
prints: same lock, same pins except torch's build (the real cpu and cuda locks), or which packages differ."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmrepro.core import provenance

ROOT = Path(__file__).resolve().parents[2]


def _record(lock: str, variant: str, torch: str) -> dict:
    text = (ROOT / "requirements" / lock).read_text()
    return {"variant": variant, "torch": torch, "lock": f"requirements/{lock}", "drift": [],
            "lock_sha256": hashlib.sha256(text.encode()).hexdigest(), "pins": provenance.lock_pins(text)}


def test_stack_of_this_environment_names_its_lock(monkeypatch):
    monkeypatch.delenv("LLMREPRO_VARIANT", raising=False)
    monkeypatch.delenv("LLMREPRO_LOCK", raising=False)
    s = provenance.stack()
    assert (s["variant"], s["lock"]) == ("cpu", "requirements/cpu.lock")  # the test venv: torch's CPU build
    assert s["lock_sha256"] == hashlib.sha256((ROOT / "requirements/cpu.lock").read_bytes()).hexdigest()
    assert s["pins"]["torch"] == s["torch"] == "2.13.0+cpu"


def test_stack_in_an_image_reads_its_variant_and_lock_from_the_environment(monkeypatch, tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.13.0 \\\n    --hash=sha256:00\nnot-installed-anywhere==1.0\n")
    monkeypatch.setenv("LLMREPRO_VARIANT", "cuda")
    monkeypatch.setenv("LLMREPRO_LOCK", str(lock))
    s = provenance.stack()
    assert (s["variant"], s["lock"], s["pins"]) == ("cuda", str(lock), {"torch": "2.13.0",
                                                                         "not-installed-anywhere": "1.0"})
    # 2.13.0+cpu is installed: a pin with no local tag accepts the same release, so only the missing one drifts
    assert s["drift"] == ["not-installed-anywhere missing (lock: 1.0)"]
    monkeypatch.setenv("LLMREPRO_LOCK", str(tmp_path / "none.lock"))
    assert provenance.stack()["lock_sha256"] is None


def test_lock_drift():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "rank-bm25": "0.2.2"}
    assert provenance.lock_drift(pins, {"torch": "2.13.0+cu130", "numpy": "2.4.6", "rank-bm25": "0.2.2"}) == []
    assert provenance.lock_drift(pins, {"torch": "2.12.0+cu130", "numpy": "2.5.0"}) == [
        "numpy 2.5.0 (lock: 2.4.6)", "rank-bm25 missing (lock: 0.2.2)", "torch 2.12.0+cu130 (lock: 2.13.0)"]
    assert provenance.lock_drift({"torch": "2.13.0+cpu"}, {"torch": "2.13.0"}) == ["torch 2.13.0 (lock: 2.13.0+cpu)"]


def test_compare_stacks_same_lock_and_cpu_vs_cuda():
    cpu = _record("cpu.lock", "cpu", "2.13.0+cpu")
    cuda = _record("cuda.lock", "cuda", "2.13.0+cu130")
    assert provenance.compare_stacks(cpu, dict(cpu)) == f"stack: the same lock (cpu, sha256 {cpu['lock_sha256'][:12]})"
    assert provenance.compare_stacks(cpu, cuda) == ("stack: the same pinned packages except torch's build "
                                                    "(2.13.0+cpu on cpu, 2.13.0+cu130 on cuda) and the CUDA libraries")


def test_compare_stacks_names_what_differs():
    cpu = _record("cpu.lock", "cpu", "2.13.0+cpu")
    newer = dict(cpu, lock_sha256="0" * 64, pins={**cpu["pins"], "transformers": "9.9.9"})
    del newer["pins"]["rank-bm25"]
    line = provenance.compare_stacks(cpu, newer)
    assert line == (f"stack: different locks: 2 package(s) differ (rank-bm25 0.2.2 vs -, transformers "
                    f"{cpu['pins']['transformers']} vs 9.9.9)")
    by_hand = dict(cpu, drift=["numpy 2.5.0 (lock: 2.4.6)"])
    assert provenance.compare_stacks(by_hand, cpu) == (
        f"stack: the same lock (cpu, sha256 {cpu['lock_sha256'][:12]}); but the original run's environment differs "
        "from its lock in 1 package(s) (numpy 2.5.0 (lock: 2.4.6))")
    assert provenance.compare_stacks(None, cpu).startswith("stack: not recorded for both runs")
