"""The CLI end to end: listing, validation, smoke, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmrepro.core import catalog

EXP = "instruct/dolly-pythia-2.8b"


def test_list_shows_every_experiment(cli):
    code, out, _ = cli("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["experiment", "source", "recipe", "description"]
    assert len(lines) == 2 + len(catalog.names())
    assert any(line.startswith(EXP) and "instruction-tuning" in line and "instruct-sft" in line for line in lines)


def test_show_prints_resolved_config(cli):
    code, out, _ = cli("show", EXP, "--profile", "smoke", "train.max_steps=7")
    assert code == 0
    assert "  name: tiny-pythia\n" in out and "  max_steps: 7\n" in out and "  learning_rate: 0.003\n" in out


def test_validate_walks_the_catalog(cli):
    code, out, err = cli("validate")
    assert code == 0, err
    assert out.startswith(f"ok: {len(catalog.names())} experiments")


def bad_files(tmp_path: Path) -> dict[str, Path]:
    """The inputs a new user gets wrong: an empty dataset, a checkpoint whose config.json is `{}`, a file where the
    output directory should go, a JSONL file broken half-way, a file that only claims to be parquet."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "a-file").write_text("mine")
    row = json.dumps({"instruction": "a", "context": "", "response": "b", "category": "c"})
    (tmp_path / "broken.jsonl").write_text(row + "\n{broken\n")
    (tmp_path / "fake.parquet").write_text("not parquet")
    return {p.name.split(".")[0].replace("-", "_"): p for p in tmp_path.iterdir()}


BAD_FILES = [
    ("data.name={empty}", "dataset {empty}: the file is empty (format dolly needs rows with instruction"),
    ("model.name={model}", "model {model}: config.json has no model_type, so it is not a transformers checkpoint"),
    ("--output-dir={a_file}", "output directory {a_file} exists and is not a directory"),
    ("data.name={broken}", "dataset {broken}: cannot parse: JSON parse error"),
    ("data.name={fake}", "dataset {fake}: cannot read: Parquet magic bytes not found"),
]


@pytest.mark.parametrize("args, message", [
    (["run", "instruct/nope"], "unknown experiment 'instruct/nope'"),
    (["run", EXP, "--profile", "smoke", "train.bogus=1"], "params.train.bogus: unknown key"),
    (["run", EXP, "--profile", "smoke", "train.max_steps=ten"], "params.train.max_steps: Input should be a valid integer"),
    (["run", EXP, "--profile", "smoke", "data.name=/missing/dolly.jsonl"], "dataset file not found: /missing/dolly.jsonl"),
    (["run", EXP, "--profile", "smoke", "model.name=nobody/no-such-model"], "model 'nobody/no-such-model' not found"),
    (["run", EXP, "--profile", "nope"], "has no profile 'nope'"),
    (["run", EXP, "--profile", "smoke", "oops"], "unrecognized arguments: oops"),
    *[(["run", EXP, "--profile", "smoke", *arg.split("=", 1)] if arg.startswith("--") else
       ["run", EXP, "--profile", "smoke", arg], message) for arg, message in BAD_FILES],
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    from llmrepro.cli import main

    files = bad_files(tmp_path / "in")
    args, message = [a.format(**files) for a in args], message.format(**files)
    out = tmp_path / "outputs"
    try:
        code = main([*args[:2], "--output-dir", str(out), *args[2:]])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("llmrepro") and message in err
    assert not out.exists()


NOISY_SITE = """
import importlib.abc, logging, sys
warned = set()
class Noisy(importlib.abc.MetaPathFinder):
    # a third-party library that logs a warning when it is imported (bitsandbytes' CPU backend does so on
    # machines with AVX512-BF16): the terminal must still show nothing but llmrepro's own line
    def find_spec(self, name, path=None, target=None):
        if name in {"yaml", "pydantic", "numpy", "torch", "transformers", "datasets", "peft"} and name not in warned:
            warned.add(name)
            logging.getLogger("bitsandbytes.cextension").warning("Failed to load CPU gemm_4bit_forward (%s)", name)
        return None
sys.meta_path.insert(0, Noisy())
"""


@pytest.mark.parametrize("arg, message", [
    ("data.name=/missing/dolly.jsonl", "dataset file not found: /missing/dolly.jsonl"), *BAD_FILES[:4]])
def test_bad_input_in_a_real_process_is_one_line_even_with_noisy_imports(tmp_path, arg, message):
    """In a fresh interpreter whose third-party imports log warnings (as bitsandbytes does on some CPUs)."""
    files = bad_files(tmp_path / "in")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NOISY_SITE)
    out = tmp_path / "outputs"
    args = ["--output-dir", str(out), *arg.format(**files).split("=", 1)] if arg.startswith("--") else \
        ["--output-dir", str(out), arg.format(**files)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "llmrepro.cli", "run", EXP, "--profile", "smoke", *args],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmrepro: error: " + message.format(**files)) and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert proc.stdout == "" and not out.exists() and files["a_file"].read_text() == "mine"


def test_the_noisy_import_would_be_seen_without_our_logging(tmp_path):
    """The simulation is real: the same hook prints its warning when nothing routes the records."""
    (tmp_path / "sitecustomize.py").write_text(NOISY_SITE)
    proc = subprocess.run([sys.executable, "-c", "import yaml"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.stderr == "Failed to load CPU gemm_4bit_forward (yaml)\n"


def test_malformed_rows_and_existing_run(tmp_path, cli):
    bad = tmp_path / "dolly.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "context": "", "response": 3, "category": "x"}) + "\n")
    out = tmp_path / "outputs"
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(out), f"data.name={bad}")
    assert code == 2 and err.strip().endswith("row 0, column 'response': expected str, got int 3")
    assert not out.exists()

    args = ("run", EXP, "--profile", "smoke", "--output-dir", str(out), "train.max_steps=1", "test_size=4",
            "save_model=false")
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 2 and "a finished run already exists" in err and "--force" in err


def test_smoke_summary_and_reuse(tmp_path, cli):
    args = ("smoke", "--only", EXP, "--output-dir", str(tmp_path), "train.max_steps=2", "test_size=4",
            "save_model=false")
    code, out, _ = cli(*args)
    assert code == 0
    assert out.splitlines()[0].split() == ["experiment", "status", "seconds", "metrics"]
    assert f"{EXP}  ok" in out and out.strip().endswith("1 passed, 0 failed")
    code, out, _ = cli(*args)
    assert code == 0 and f"{EXP}  reused" in out
    code, _, err = cli("smoke", "--only", "nothing/*")
    assert code == 2 and "no experiment matches" in err
