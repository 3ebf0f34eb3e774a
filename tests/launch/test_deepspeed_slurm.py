"""DeepSpeed on the local SLURM cluster and the planner in front of `invoke slurm`.

- A 2-process ZeRO-2 job (srun + torchrun, CPU, gloo; the shipped zero2.json) trains exactly like one process
  without DeepSpeed on the same global batch. Needs a running cluster (`bash scripts/slurm-cluster.sh start`) and
  DeepSpeed; `.ci/run` requires it (LLMREPRO_REQUIRE_MARKERS=slurm), elsewhere it skips without them.
- `invoke slurm` plans a job first and refuses, in one line, one that would not fit (`--no-plan` skips that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import cluster, wait

from llmrepro.core import catalog
from llmrepro.launch import slurm

SFT = "instruct/dolly-pythia-2.8b"
ROOT = Path(__file__).resolve().parents[2]
# the global token mean (transformers 5's default), so that 2 x batch 4 equals 1 x batch 8 whatever the lengths
STEPS = ["train.max_steps=4", "train.logging_steps=1", "train.average_tokens_across_devices=true"]


@pytest.mark.slurm
@cluster
def test_zero2_two_processes_match_one_process(tmp_path, cli):
    pytest.importorskip("deepspeed")
    # one process first: it also builds the tiny model, which two ranks must not build at once
    code, _, err = cli("run", SFT, "--profile", "smoke", *STEPS, "train.batch_size=8",
                       "--output-dir", str(tmp_path / "single"))
    assert code == 0, err
    (single,) = (tmp_path / "single" / SFT).iterdir()
    one = json.loads((single / "metrics.json").read_text())
    [script] = slurm.render(catalog.load(SFT), slurm.options(
        profile="smoke", procs_per_node=2, deepspeed="zero2", overrides=[*STEPS, "train.batch_size=4"],
        output_dir=str(tmp_path / "cluster")))
    assert "train.deepspeed=zero2" in script.text and "srun --ntasks-per-node=1 torchrun" in script.text
    [job] = slurm.submit([script])
    log = tmp_path / "cluster" / SFT / "slurm" / f"{script.path.stem}.{job}.log"
    assert wait(job, timeout=600) == {"COMPLETED"}, log.read_text()[-3000:]
    run_dir = tmp_path / "cluster" / SFT / script.path.stem
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    two = manifest["metrics"]
    assert two["zero_stage"] == 2  # DeepSpeed really trained (accelerate can fall back to DDP silently)
    assert (run_dir / "model" / "model.safetensors").is_file()  # ZeRO-2's save, on rank 0

    assert "zero_stage" not in one and one["steps"] == two["steps"] == 4
    for key in ("loss_first", "loss_last", "train_loss", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def _invoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "invoke", "slurm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_invoke_slurm_refuses_a_job_the_plan_says_will_not_fit():
    refused = _invoke("instruct/dolly-pythia-12b-oom", "--dry-run")
    assert refused.returncode == 3 and refused.stdout == ""
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("refused: ")]
    assert line.startswith("refused: plan instruct/dolly-pythia-12b-oom on 2 x GPU of 80.0 GiB: OOM: needs ")
    assert "smallest change that fits: train.deepspeed=zero3_offload" in line and line.endswith("--no-plan)")
    forced = _invoke("instruct/dolly-pythia-12b-oom", "--dry-run", "--no-plan")
    assert forced.returncode == 0 and "#SBATCH --gpus-per-node=2" in forced.stdout
    fits = _invoke("instruct/dolly-pythia-12b-oom", "--dry-run", "--gpus-per-node", "4")
    assert fits.returncode == 0 and "# plan instruct/dolly-pythia-12b-oom on 4 x GPU of 80.0 GiB: fits: " in fits.stdout
    assert "#SBATCH --gpus-per-node=4" in fits.stdout
