"""The architecture, checked: which package may import which, no import circles, no recipe importing another,
and a catalog layer that answers without torch.

Layers, lowest first (a module may import its own package and lower layers, never a higher one or a sibling
package of the same layer):
    core  <  lm, launch  <  gradients, training, representations  <  recipes  <  cli, devtools
"""

from __future__ import annotations

import ast
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "llmrepro"
LAYERS = {"core": 0, "lm": 1, "launch": 1, "gradients": 2, "training": 2, "representations": 2, "recipes": 3,
          "cli": 4, "devtools": 4}
HEAVY = ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes", "trak", "sklearn", "scipy", "deepspeed",
         "numpy", "matplotlib")  # numpy alone costs ~0.15 s of the 1 s budget


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every llmrepro module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in MODULES else node.module for n in names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] == "llmrepro"}
    return {n if n in MODULES else n.rsplit(".", 1)[0] for n in out}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "core"  # llmrepro/__init__ (the version) sits with core
    return top, LAYERS[top]


def test_every_module_belongs_to_a_layer():
    assert {layer(m)[0] for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_or_sideways_import(module):
    package, rank = layer(module)
    bad = [(imp, layer(imp)) for imp in GRAPH[module] if imp != "llmrepro" and layer(imp)[0] != package
           and layer(imp)[1] >= rank]
    assert not bad, f"{module} (layer {package}) imports {bad}"


def test_no_recipe_imports_another_recipe():
    for module, deps in GRAPH.items():
        if module.startswith("llmrepro.recipes."):
            assert not [d for d in deps if d.startswith("llmrepro.recipes.") and d != module], module


def test_no_import_circle():
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(GRAPH.get(node, ())):
            if dep == node or dep not in GRAPH or _is_parent(dep, node):
                continue
            if state.get(dep) == "open":
                raise AssertionError(f"import circle: {' -> '.join([*path, node, dep])}")
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for name in GRAPH:
        if name not in state:
            visit(name, [])


def _is_parent(package: str, module: str) -> bool:
    """A module importing through its own package's __init__ (`from llmrepro.lm.fixtures import facts`)."""
    return module.startswith(package + ".")


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: run them on a made-up graph."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {"llmrepro.lm.a": {"llmrepro.lm.b"}, "llmrepro.lm.b": {"llmrepro.lm.a"}}
        with pytest.raises(AssertionError, match="import circle: llmrepro.lm.a -> llmrepro.lm.b -> llmrepro.lm.a"):
            test_no_import_circle()
        GRAPH = {"llmrepro.core.x": {"llmrepro.recipes.y"}}
        with pytest.raises(AssertionError, match="llmrepro.core.x"):
            test_no_upward_or_sideways_import("llmrepro.core.x")
    finally:
        GRAPH = saved


CATALOG_SCRIPT = f"""
import sys, time
start = time.perf_counter()
from llmrepro.core import catalog
for exp in catalog.load_all():
    for profile in [None, *exp.spec.profiles]:
        exp.resolve(profile)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_catalog_and_every_recipe_config_load_without_heavy_libraries():
    out = subprocess.run([sys.executable, "-c", CATALOG_SCRIPT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("args", [["list"], ["show", "instruct/dolly-pythia-2.8b", "--profile", "smoke"],
                                  ["validate"], ["run", "instruct/nope"]])
def test_catalog_commands_answer_in_under_a_second(args):
    """`list`, `show`, `validate` and a bad experiment name, in a fresh interpreter, best of three. The CPU time
    the command takes (user + system) is what other load on a shared machine cannot inflate; the wall time is
    checked as well when the machine is otherwise idle (1-minute load average under 1)."""
    runs = [_timed([sys.executable, "-m", "llmrepro.cli", *args]) for _ in range(3)]
    cpu, wall = min(c for c, _ in runs), min(w for _, w in runs)
    assert cpu < 1.0, f"llmrepro {' '.join(args)} took {cpu:.2f} s of CPU"
    if os.getloadavg()[0] < 1.0:
        assert wall < 1.0, f"llmrepro {' '.join(args)} took {wall:.2f} s"


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `cmd`."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall
