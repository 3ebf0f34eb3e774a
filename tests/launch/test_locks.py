"""The locks are one resolution: cpu.lock and cuda.lock agree on every package they share (version and hashes),
differ only in torch's build and the CUDA libraries, and are resolved for the one Python minor that CI and both images
run; the build-only and model locks pin what the images use; every third-party import of src/ is a declared
dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib

from llmrepro.core.provenance import CUDA_ONLY, normalise
from llmrepro.lm import builtin

ROOT = Path(__file__).resolve().parents[2]
REQ = ROOT / "requirements"


def parse_lock(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """{name: (version, sha256 hashes)} of a uv lock file."""
    entries, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = normalise(m.group(1))
            entries[current] = (m.group(2), frozenset())
        elif not line.startswith(" "):
            current = None
        if current:
            version, hashes = entries[current]
            entries[current] = (version, hashes | set(re.findall(r"--hash=sha256:([0-9a-f]{64})", line)))
    return entries


def lock_differences(cpu_text: str, cuda_text: str) -> list[str]:
    """Everything in which the two locks differ beyond torch's build and the CUDA-only packages."""
    cpu, cuda = parse_lock(cpu_text), parse_lock(cuda_text)
    problems = [f"{n} only in cpu.lock" for n in sorted(set(cpu) - set(cuda))]
    problems += [f"{n} only in cuda.lock" for n in sorted(set(cuda) - set(cpu)) if not CUDA_ONLY.fullmatch(n)]
    for name in sorted(set(cpu) & set(cuda)):
        (v1, h1), (v2, h2) = cpu[name], cuda[name]
        if name == "torch":
            if v1.split("+")[0] != v2.split("+")[0]:
                problems.append(f"torch {v1} vs {v2}: not the same release")
        elif v1 != v2:
            problems.append(f"{name} {v1} vs {v2}")
        elif h1 != h2:
            problems.append(f"{name} {v1}: different hashes")
    return problems


def test_the_two_locks_agree_on_every_shared_package():
    cpu_text, cuda_text = (REQ / "cpu.lock").read_text(), (REQ / "cuda.lock").read_text()
    assert lock_differences(cpu_text, cuda_text) == []
    cpu, cuda = parse_lock(cpu_text), parse_lock(cuda_text)
    assert cpu["torch"][0].endswith("+cpu") and "+" not in cuda["torch"][0]  # the CPU build vs PyPI's CUDA build
    assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"} <= set(cuda) - set(cpu)
    assert len(set(cpu) & set(cuda)) > 90  # everything else, dev tools included


def test_a_drifted_lock_is_caught():
    cpu_text, cuda_text = (REQ / "cpu.lock").read_text(), (REQ / "cuda.lock").read_text()
    numpy = parse_lock(cuda_text)["numpy"][0]
    drifted = re.sub(rf"^numpy=={re.escape(numpy)} ", "numpy==0.0.1 ", cuda_text, flags=re.MULTILINE)
    assert lock_differences(cpu_text, drifted) == [f"numpy {numpy} vs 0.0.1"]
    extra = cuda_text + "bm25s==0.3.16 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert lock_differences(cpu_text, extra) == ["bm25s only in cuda.lock"]
    rehashed = cuda_text.replace(parse_lock(cuda_text)["pyyaml"][1].__iter__().__next__(), "f" * 64)
    assert lock_differences(cpu_text, rehashed) == [f"pyyaml {parse_lock(cuda_text)['pyyaml'][0]}: different hashes"]


def test_one_python_minor_for_ci_images_and_locks():
    """The locks are resolved for 3.11 (`invoke lock`), the images check for 3.11, both CI workflows set up 3.11."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert minor == "3.11"  # the interpreter running the tests: CI's, bootstrap's
    assert "--python-version 3.11 " in (ROOT / "tasks.py").read_text()
    assert "--python-version 3.12" not in (ROOT / "tasks.py").read_text()
    assert "v == (3, 11)" in (ROOT / "docker/Dockerfile").read_text()
    for workflow in (ROOT / ".github/workflows").glob("*.yml"):
        assert set(re.findall(r'python-version: "([\d.]+)"', workflow.read_text())) <= {"3.11"}, workflow.name
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11"


def test_cuda_build_lock_matches_the_cuda_runtime():
    """The CUDA compiler wheels of the builder stage are the CUDA release of torch's runtime wheel, and fast_jl's
    sdist is pinned by its hash."""
    build, cuda = parse_lock((REQ / "cuda-build.lock").read_text()), parse_lock((REQ / "cuda.lock").read_text())
    runtime = ".".join(cuda["nvidia-cuda-runtime"][0].split(".")[:2])  # 13.0
    for name in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-cuda-cccl", "nvidia-nvvm"):
        assert build[name][0].startswith(runtime + "."), (name, build[name][0], runtime)
    assert build["fast-jl"] == ("0.1.3", {"216100e9778da38b906a3c2a18b7c9e93bc395576e6943c7f920c98cce179775"})
    assert "torch" in build  # fast_jl is built against the very torch the image runs:
    assert {n: build[n] for n in set(build) & set(cuda)} == {n: cuda[n] for n in set(build) & set(cuda)}


def test_models_lock_pins_the_builtin_wheel():
    """The images carry the wheel llmrepro.lm.builtin pins, with the same hash."""
    models = parse_lock((REQ / "models.lock").read_text())
    for spec in builtin.BUILTINS.values():
        name, version = spec.package.split("==")
        assert models[normalise(name)][0] == version
        assert spec.sha256 in models[normalise(name)][1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _requirement_name(req: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def test_every_third_party_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    # fast_jl: only in the CUDA image (built there, docker/Dockerfile); imported where the cuda projector runs.
    optional = {"fast-jl"}
    modules = set().union(*(_imports(p) for p in (ROOT / "src").rglob("*.py")))
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m not in {"llmrepro", "__future__"})
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in third_party:
        names = {normalise(d) for d in dists.get(module, [module.replace("_", "-")])}
        if not names & (declared | optional):
            undeclared[module] = sorted(names)
    assert undeclared == {}, f"imported in src/ but not in pyproject.toml's dependencies: {undeclared}"


@pytest.mark.parametrize("lock", ["cpu.lock", "cuda.lock"])
def test_every_declared_dependency_is_locked(lock):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert wanted - set(parse_lock((REQ / lock).read_text())) == set()
