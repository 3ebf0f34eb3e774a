"""Test environment: offline, tiny models cached once per session, no progress bars, no tracking."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["LLMREPRO_PROGRESS"] = "0"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers at their import
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("LLMREPRO_OUTPUT_DIR", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def llmrepro_cache(tmp_path_factory):
    """One tiny-model and fixture cache for the whole session (LLMREPRO_CACHE may point at a warm one)."""
    if "LLMREPRO_CACHE" not in os.environ:
        os.environ["LLMREPRO_CACHE"] = str(tmp_path_factory.mktemp("llmrepro-cache"))
    return os.environ["LLMREPRO_CACHE"]


@pytest.fixture
def cli(capsys):
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""
    from llmrepro.cli import main

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (`invoke test --slow`)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (minutes: the CUDA image build) are deselected unless --slow is given."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where LLMREPRO_REQUIRE_MARKERS names a marker (e.g. "slurm container", set by .ci/run), a test with that
    marker may not skip: a missing podman or cluster fails the run instead of passing it silently."""
    outcome = yield
    report = outcome.get_result()
    required = set(os.environ.get("LLMREPRO_REQUIRE_MARKERS", "").split())
    if report.skipped and required & {m.name for m in item.iter_markers()}:
        report.outcome = "failed"
        report.longrepr = f"required by LLMREPRO_REQUIRE_MARKERS but skipped: {call.excinfo.value if call.excinfo else ''}"
