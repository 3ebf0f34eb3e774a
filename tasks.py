"""invoke tasks: thin wrappers that call the `llmrepro` CLI and the test/lint tools.

    invoke setup            # install the locked dependencies and the package into the active environment
    invoke test             # the test suite
    invoke lint             # ruff, plus hadolint/actionlint on the container and workflow files
    invoke list             # the experiment catalog
    invoke run EXP -p smoke # one experiment
    invoke smoke            # every experiment's smoke profile
"""

from __future__ import annotations

import shlex

from invoke import task


def _llmrepro(c, *args: str, pty: bool = False):
    return c.run(" ".join(["llmrepro", *map(shlex.quote, args)]), echo=True, pty=pty)


@task(help={"lock": "requirements lock file to install (default requirements/cpu.lock)"})
def setup(c, lock="requirements/cpu.lock"):
    """Install the locked dependencies, then the package itself (editable, no dependency resolution)."""
    c.run(f"python -m pip install --require-hashes -r {lock}", echo=True)
    c.run("python -m pip install --no-deps -e .", echo=True)


@task(help={"k": "only tests matching this pytest -k expression", "x": "stop at the first failure"})
def test(c, k="", x=False):
    """Run the test suite (offline; tiny models are built into a temporary cache)."""
    args = ["python", "-m", "pytest", "-q"] + (["-k", k] if k else []) + (["-x"] if x else [])
    c.run(" ".join(map(shlex.quote, args)), echo=True, pty=False)


@task
def lint(c):
    """ruff on the Python code."""
    c.run("ruff check src tests benchmarks tasks.py", echo=True)


@task(name="list")
def list_(c):
    """The experiment catalog."""
    _llmrepro(c, "list")


@task(help={"experiment": "experiment name, e.g. instruct/dolly-pythia-2.8b", "profile": "profile, e.g. smoke",
            "override": "key=value (repeatable)", "force": "replace a finished run", "resume": "continue a run"},
      iterable=["override"])
def run(c, experiment, profile=None, override=None, force=False, resume=False):
    """Run one experiment locally."""
    args = ["run", experiment] + (["--profile", profile] if profile else []) + (["--force"] if force else []) \
        + (["--resume"] if resume else []) + list(override or [])
    _llmrepro(c, *args)


@task(help={"only": "glob of experiments to include (repeatable)"}, iterable=["only"])
def smoke(c, only=None):
    """Every experiment's smoke profile, then a summary table."""
    _llmrepro(c, "smoke", *[a for g in (only or []) for a in ("--only", g)])
