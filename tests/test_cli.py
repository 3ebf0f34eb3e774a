"""The CLI end to end: listing, validation, smoke, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.parametrize("args, message", [
    (["run", "instruct/nope"], "unknown experiment 'instruct/nope'"),
    (["run", EXP, "--profile", "smoke", "train.bogus=1"], "params.train.bogus: unknown key"),
    (["run", EXP, "--profile", "smoke", "train.max_steps=ten"], "params.train.max_steps: Input should be a valid integer"),
    (["run", EXP, "--profile", "smoke", "data.name=/missing/dolly.jsonl"], "dataset file not found: /missing/dolly.jsonl"),
    (["run", EXP, "--profile", "smoke", "model.name=nobody/no-such-model"], "model 'nobody/no-such-model' not found"),
    (["run", EXP, "--profile", "nope"], "has no profile 'nope'"),
    (["run", EXP, "--profile", "smoke", "oops"], "unrecognized arguments: oops"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    from llmrepro.cli import main

    out = tmp_path / "outputs"
    try:
        code = main([*args, "--output-dir", str(out)])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("llmrepro") and message in err
    assert not out.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    out = tmp_path / "outputs"
    proc = subprocess.run([sys.executable, "-m", "llmrepro.cli", "run", EXP, "--profile", "smoke", "--output-dir", str(out),
                           "data.name=/missing/dolly.jsonl"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "llmrepro: error: dataset file not found: /missing/dolly.jsonl\n"
    assert proc.stdout == "" and not out.exists()


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
