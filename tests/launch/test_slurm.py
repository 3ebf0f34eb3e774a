"""SLURM jobs: rendered sbatch scripts (exact), option errors, and jobs on a real cluster (`-m slurm`).

The `slurm` tests need a running cluster (`bash scripts/slurm-cluster.sh start`) and skip without one.
Jobs inherit this process's environment (sbatch's default), so they share the session's tiny-model cache.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from slurm_cluster import cluster, wait

from llmrepro.core import catalog
from llmrepro.core.errors import UserError
from llmrepro.gradients import shards
from llmrepro.launch import slurm

SFT = "instruct/dolly-pythia-2.8b"
GRAD = "gradients/olmo2-7b-sft-normal8192-train"
ARRAY = {"tasks": [{"shard_start": i, "shard_end": i + 1} for i in range(4)], "merge": {"merge": True}}


def run_id(exp: catalog.Experiment, profile: str | None, overrides: list[str]) -> str:
    return exp.run_spec(profile, overrides).default_run_id


@pytest.fixture
def array_catalog(tmp_path, monkeypatch) -> catalog.Experiment:
    """The catalog with the gradient extraction given a 4-slice `array:` section (smoke: 24 rows, 6 per shard)."""
    root = tmp_path / "experiments"
    shutil.copytree(catalog.experiments_dir(), root)
    path = root / f"{GRAD}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["profiles"]["smoke"]["gradients_per_file"] = 6
    path.write_text(yaml.safe_dump({**spec, "array": ARRAY}, sort_keys=False))
    monkeypatch.setenv("LLMREPRO_EXPERIMENTS", str(root))
    return catalog.load(GRAD)


# ------------------------------------------------------------------------------------------ rendering


def test_local_smoke_script(tmp_path):
    exp = catalog.load(SFT)
    [script] = slurm.render(exp, slurm.options(profile="smoke", output_dir=str(tmp_path), venv="/opt/venv",
                                               overrides=["train.max_steps=4"]))
    rid, logs = run_id(exp, "smoke", ["train.max_steps=4"]), tmp_path / SFT / "slurm"
    assert script.path == logs / f"{rid}.sbatch" and script.after is None
    assert script.text == f"""#!/bin/bash
#SBATCH --job-name=instruct-dolly-pythia-2.8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output={logs}/{rid}.%j.log
# instruct/dolly-pythia-2.8b, profile smoke: rendered by `invoke slurm`; resubmit with `sbatch {logs}/{rid}.sbatch`
set -euo pipefail
source /opt/venv/bin/activate
if [ -d "{tmp_path}/{SFT}/{rid}" ]; then
    echo "{tmp_path}/{SFT}/{rid} is finished: skipped"
else
    llmrepro run {SFT} train.max_steps=4 --profile smoke --output-dir {tmp_path} --run-id {rid} --resume
fi
"""


def test_apptainer_multinode_deepspeed_script(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", "/data/hf")
    exp = catalog.load(SFT)
    [script] = slurm.render(exp, slurm.options(runtime="apptainer", nodes=2, gpus_per_node=4, partition="gpu",
                                               deepspeed="zero3", sif="/images/llmrepro.sif", output_dir=str(tmp_path)))
    rid, logs = run_id(exp, None, ["train.deepspeed=zero3"]), tmp_path / SFT / "slurm"
    assert script.text == f"""#!/bin/bash
#SBATCH --job-name=instruct-dolly-pythia-2.8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=256G
#SBATCH --time=12:00:00
#SBATCH --gpus-per-node=4
#SBATCH --partition=gpu
#SBATCH --output={logs}/{rid}.%j.log
# instruct/dolly-pythia-2.8b: rendered by `invoke slurm`; resubmit with `sbatch {logs}/{rid}.sbatch`
set -euo pipefail
mkdir -p {tmp_path} /data/hf
if [ -n "${{HF_TOKEN:-}}" ]; then export APPTAINERENV_HF_TOKEN="$HF_TOKEN"; fi
if [ -n "${{WANDB_API_KEY:-}}" ]; then export APPTAINERENV_WANDB_API_KEY="$WANDB_API_KEY"; fi
if [ -d "{tmp_path}/{SFT}/{rid}" ]; then
    echo "{tmp_path}/{SFT}/{rid} is finished: skipped"
else
    RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$((29500 + SLURM_JOB_ID % 1000))"
    srun --ntasks-per-node=1 apptainer exec --containall --cleanenv --nv --bind {tmp_path}:/outputs \
--bind /data/hf:/cache/huggingface /images/llmrepro.sif torchrun --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node=4 \
--rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" -m llmrepro.cli run {SFT} \
train.deepspeed=zero3 --output-dir /outputs --run-id {rid} --resume
fi
"""
    assert "HF_TOKEN=" not in script.text.replace('APPTAINERENV_HF_TOKEN="$HF_TOKEN"', "")  # no secret values


def test_apptainer_array_and_merge_scripts(tmp_path, monkeypatch, array_catalog):
    monkeypatch.setenv("HF_HOME", "/data/hf")
    exp = array_catalog
    array, merge = slurm.render(exp, slurm.options(runtime="apptainer", profile="smoke", array=True,
                                                   sif="/images/llmrepro.sif", output_dir=str(tmp_path)))
    tasks = [[f"shard_start={i}", f"shard_end={i + 1}"] for i in range(4)]
    ids = [run_id(exp, "smoke", t) for t in tasks]
    merge_id = run_id(exp, "smoke", ["merge=true"])
    name, logs = array.path.stem, tmp_path / GRAD / "slurm"
    assert name.startswith("smoke-array-") and merge.path == logs / f"{name}-merge.sbatch" and merge.after == 0
    container = ("apptainer {verb} --containall --cleanenv "
                 f"--bind {tmp_path}:/outputs --bind /data/hf:/cache/huggingface /images/llmrepro.sif")
    header = f"""#!/bin/bash
#SBATCH --job-name=gradients-olmo2-7b-sft-normal8192-train{{merge}}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=00:30:00
{{array}}#SBATCH --output={logs}/{{name}}.{{log}}.log
# {GRAD}, profile smoke: rendered by `invoke slurm`; resubmit with `sbatch {logs}/{{name}}.sbatch`
set -euo pipefail
mkdir -p {tmp_path} /data/hf
if [ -n "${{{{HF_TOKEN:-}}}}" ]; then export APPTAINERENV_HF_TOKEN="$HF_TOKEN"; fi
if [ -n "${{{{WANDB_API_KEY:-}}}}" ]; then export APPTAINERENV_WANDB_API_KEY="$WANDB_API_KEY"; fi
"""
    cases = "".join(f"    {i}) RUN_ID={ids[i]}; TASK=(shard_start={i} shard_end={i + 1}) ;;\n" for i in range(4))
    assert array.text == header.format(merge="", array="#SBATCH --array=0-3\n", name=name, log="%A_%a") + f"""\
case "$SLURM_ARRAY_TASK_ID" in
{cases}esac
if [ -d "{tmp_path}/{GRAD}/$RUN_ID" ]; then
    echo "{tmp_path}/{GRAD}/$RUN_ID is finished: skipped"
else
    {container.format(verb="run")} run {GRAD} "${{TASK[@]}}" --profile smoke --output-dir /outputs --run-id $RUN_ID --resume
fi
"""
    plan = json.dumps([{"run_id": r, "overrides": t} for r, t in zip(ids, tasks, strict=True)])
    assert merge.text == header.format(merge="-merge", array="", name=f"{name}-merge", log="%j") + f"""\
{container.format(verb="exec")} python -m llmrepro.launch.slurm summarize /outputs/{GRAD} slurm/{name}.summary.json '{plan}'
if [ -d "{tmp_path}/{GRAD}/{merge_id}" ]; then
    echo "{tmp_path}/{GRAD}/{merge_id} is finished: skipped"
else
    {container.format(verb="run")} run {GRAD} merge=true --profile smoke --output-dir /outputs --run-id {merge_id} --resume
fi
"""


def test_sweep_tasks_are_the_product_and_profiles_pick_their_own():
    spec = catalog.ArraySpec(sweep={"a": [1, 2], "b.c": ["x", "y"]}, profiles={"smoke": {"tasks": [{"a": 0}]}})
    assert spec.task_overrides(None) == [{"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"},
                                         {"a": 2, "b.c": "x"}, {"a": 2, "b.c": "y"}]
    assert spec.task_overrides("smoke") == [{"a": 0}]
    assert spec.task_overrides("other") == spec.task_overrides(None)
    with pytest.raises(ValueError, match="give either tasks or sweep"):
        catalog.ArraySpec(tasks=[{"a": 1}], sweep={"a": [1]})


@pytest.mark.parametrize(("experiment", "kwargs", "message"), [
    (SFT, {"array": True}, "has no `array:` section"),
    (GRAD, {"procs_per_node": 2}, "recipe 'extract-gradients' runs in one process"),
    (SFT, {"nodes": 0}, "slurm options: invalid config: params.nodes: Input should be greater than or equal to 1"),
    (SFT, {"runtime": "docker"}, "params.runtime: Input should be 'local' or 'apptainer'"),
    (SFT, {"overrides": ["train.batch_size=0"]}, "params.train.batch_size"),
])
def test_bad_options_fail_before_submitting(experiment, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slurm.render(catalog.load(experiment), slurm.options(**kwargs))


def test_no_slurm_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"^no SLURM here: sbatch is not installed; submit from a cluster login node"):
        slurm.launch(SFT, profile="smoke", output_dir=str(tmp_path))
    assert not (tmp_path / SFT).exists()


@pytest.mark.skipif(not shutil.which("sbatch"), reason="slurm-client not installed")
def test_unreachable_controller_is_one_clear_error(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=nowhere(127.0.0.1)\nSlurmctldPort=1\nNodeName=n\n"
                    "PartitionName=p Nodes=ALL\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(UserError, match=r"^no SLURM controller reachable \(scontrol ping: .*\); check SLURM_CONF"):
        slurm.status("1")


# ---------------------------------------------------------------------------------- on a real cluster


@pytest.fixture(scope="module")
def sft_job(tmp_path_factory, llmrepro_cache):
    """The instruct-sft smoke profile (4 steps, batch 8, loss logged every step) as one SLURM job: (output root, run dir, job id)."""
    out = tmp_path_factory.mktemp("slurm-sft")
    [script] = slurm.render(catalog.load(SFT), slurm.options(profile="smoke", output_dir=str(out),
                                                             overrides=["train.max_steps=4", "train.logging_steps=1"]))
    [job] = slurm.submit([script])
    assert wait(job) == {"COMPLETED"}, (out / SFT / "slurm" / f"{script.path.stem}.{job}.log").read_text()
    return out, out / SFT / script.path.stem, job


@cluster
@pytest.mark.slurm
def test_smoke_job_runs_and_a_resubmission_skips_it(sft_job):
    out, run_dir, job = sft_job
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 4 and manifest["world_size"] == 1
    log = out / SFT / "slurm" / f"{run_dir.name}.{job}.log"
    assert log.read_text().splitlines()[-1] == str(run_dir)  # `llmrepro run` prints the finished run's path

    [again] = slurm.submit([slurm.Script(run_dir.parent / "slurm" / f"{run_dir.name}.sbatch",
                                         (run_dir.parent / "slurm" / f"{run_dir.name}.sbatch").read_text())])
    assert wait(again) == {"COMPLETED"}
    assert f"{run_dir} is finished: skipped" in (out / SFT / "slurm" / f"{run_dir.name}.{again}.log").read_text()
    assert "COMPLETED" in slurm.status(again)


@cluster
@pytest.mark.slurm
def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(sft_job, tmp_path):
    """2 CPU processes (gloo DDP) x batch 4 via srun + torchrun train exactly like 1 process x batch 8 (with the
    global token mean; instruct-sft's default, as the Dolly trainer, is each rank's own mean)."""
    _, single, _ = sft_job
    overrides = ["train.max_steps=4", "train.logging_steps=1", "train.batch_size=4",
                 "train.average_tokens_across_devices=true"]
    scripts = slurm.render(catalog.load(SFT), slurm.options(profile="smoke", procs_per_node=2, overrides=overrides,
                                                            output_dir=str(tmp_path)))
    assert "srun --ntasks-per-node=1 torchrun" in scripts[0].text
    [job] = slurm.submit(scripts)
    assert wait(job) == {"COMPLETED"}
    run_dir = tmp_path / SFT / scripts[0].path.stem
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert (run_dir / "model" / "tokenizer_config.json").is_file()
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, run_dir))
    for key in ("train_loss", "eval_loss", "loss_first", "loss_last"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["steps"] == one["steps"] == 4


@cluster
@pytest.mark.slurm
def test_gradient_array_and_merge_equal_a_single_process_run(array_catalog, tmp_path, cli):
    out, ref = tmp_path / "cluster", tmp_path / "single"
    scripts = slurm.render(array_catalog, slurm.options(profile="smoke", array=True, cpus_per_task=1,
                                                        output_dir=str(out)))
    array_job, merge_job = slurm.submit(scripts)
    assert wait(merge_job) == {"COMPLETED"}
    assert wait(array_job) == {"COMPLETED"}
    assert len(slurm.jobs(array_job)) == 4
    summary = json.loads((out / GRAD / "slurm" / f"{scripts[0].path.stem}.summary.json").read_text())
    assert [t["metrics"]["samples_computed"] for t in summary["tasks"]] == [6, 6, 6, 6]

    code, _, err = cli("run", GRAD, "--profile", "smoke", "--output-dir", str(ref))
    assert code == 0, err
    merged = run_id(array_catalog, "smoke", ["merge=true"])
    (merged_meta,) = (out / GRAD / merged / "gradients").glob("**/extraction.json")
    (single_meta,) = (ref / GRAD).glob("*/gradients/**/extraction.json")
    assert json.loads(merged_meta.read_text()) == json.loads(single_meta.read_text())
    a, b = (shards.load_all(m.parent, 24, 6) for m in (merged_meta, single_meta))
    assert a.shape == (24, 1024) and torch.equal(a, b)


@cluster
@pytest.mark.slurm
def test_a_failed_task_cancels_the_dependent_job(tmp_path):
    fail = slurm.Script(tmp_path / "fail.sbatch", f"#!/bin/bash\n#SBATCH --array=0-1\n#SBATCH --output={tmp_path}/%A_%a.log\n"
                        'exit "$SLURM_ARRAY_TASK_ID"\n')
    after = slurm.Script(tmp_path / "after.sbatch", f"#!/bin/bash\n#SBATCH --output={tmp_path}/after.log\necho ran\n",
                         after=0)
    array_job, merge_job = slurm.submit([fail, after])
    assert wait(array_job) == {"COMPLETED", "FAILED"}
    assert wait(merge_job, timeout=60) == {"CANCELLED"}
    assert not (tmp_path / "after.log").exists()
