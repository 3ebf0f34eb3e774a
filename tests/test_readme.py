"""The README says what the code does: two quickstart commands (the second is CI's), the catalog table is the
catalog, the layout section names every package, and every experiment it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from llmrepro import devtools
from llmrepro.core import catalog

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_quickstart_is_exactly_two_commands_and_the_second_is_what_ci_runs():
    block = re.search(r"```bash\n(.*?)```", _section("Quickstart"), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["scripts/bootstrap.sh && .venv/bin/llmrepro smoke", "scripts/bootstrap.sh && .venv/bin/invoke test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/bootstrap.sh" in ci and ci.rstrip().endswith(".venv/bin/invoke test")


def test_catalog_table_is_the_catalog():
    assert devtools.readme_with_table(README) == README, "run `python -m llmrepro.devtools readme`"
    assert catalog.table("markdown") in README


def test_layout_names_every_package_and_top_level_module():
    layout = _section("Layout")
    package = ROOT / "src" / "llmrepro"
    names = [p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = [n for n in names if n not in layout]
    assert not missing, f"README layout does not mention {missing}"


def test_every_experiment_named_in_the_prose_exists():
    prose = README[:README.index("## Catalog")]
    named = set(re.findall(r"`((?:similarity|gradients|memory_efficiency|truth|reprpo|instruct)/[a-z0-9.\-]+)`", prose))
    known = set(catalog.names())
    assert named and not sorted(n for n in named if n not in known)
