"""SLURM jobs for catalog experiments: render an sbatch script from the experiment's `resources`, submit, follow.

    invoke slurm instruct/dolly-pythia-2.8b --runtime apptainer --partition gpu
    invoke slurm instruct/dolly-pythia-2.8b --nodes 2 --gpus-per-node 4 --deepspeed zero3 --dry-run
    invoke slurm EXP --array --profile smoke        # one array task per slice, then a dependent merge job
    invoke slurm-status 1234

A job takes one of three shapes:
- one process: `llmrepro run EXP ...`, in the project's environment or through `apptainer run` of the SIF;
- distributed, when it asks for several nodes or processes per node (recipes with SUPPORTS_DISTRIBUTED only):
  `srun` starts one `torchrun` per node, which meet at a c10d rendezvous on the first node; without GPUs the
  processes train on CPU with gloo;
- an array (`--array`, experiments with an `array:` section): task i runs slice i unless its run directory
  already exists (so a resubmitted array skips finished slices), then a merge job runs once all tasks
  succeeded (`afterok`, with `--kill-on-invalid-dep=yes` so a failed slice cancels it instead of leaving it
  pending forever). The merge job writes `<array>.summary.json` (each task's overrides, run and metrics) and
  runs the experiment's `merge` step, if it has one.

The `smoke` profile asks for SMOKE_RESOURCES instead of the experiment's (a tiny model needs no GPU node).
Scripts and logs go to `<output root>/<experiment>/slurm/`, next to the runs. Secrets never enter a script:
the job inherits them from the submitting shell (and `.env`), apptainer receives them as APPTAINERENV_*.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmrepro.core import catalog, config, io, registry
from llmrepro.core.config import Strict
from llmrepro.core.errors import UserError
from llmrepro.launch import containers

SMOKE_RESOURCES = catalog.Resources(nodes=1, gpus_per_node=0, cpus_per_task=2, mem="4G", time="00:30:00")
RDZV_PORT = 29500  # plus the job id modulo 1000, so two jobs sharing a node do not collide


class Options(Strict):
    """`invoke slurm` options; None takes the experiment's resource hint."""

    runtime: Literal["local", "apptainer"] = "local"
    profile: str | None = None
    overrides: list[str] = []
    array: bool = False
    nodes: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    procs_per_node: int | None = Field(None, ge=1)  # torchrun processes per node (default: GPUs per node, or 1)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    deepspeed: Literal["zero2", "zero3"] | None = None
    output_dir: str | None = None
    sif: str | None = None  # default: the CPU or CUDA SIF that `invoke sif` builds under dist/
    venv: str = sys.prefix  # the environment a local-runtime job activates


@dataclass(frozen=True)
class Script:
    """An sbatch script and where it is saved; `after` is the index of the script it depends on."""

    path: Path
    text: str
    after: int | None = None


def options(**kwargs) -> Options:
    return config.validate(Options, {k: v for k, v in kwargs.items() if v is not None}, "slurm options")


def resources(exp: catalog.Experiment, opts: Options) -> catalog.Resources:
    base = SMOKE_RESOURCES if opts.profile == "smoke" else exp.spec.resources
    chosen = {k: getattr(opts, k) for k in catalog.Resources.model_fields if getattr(opts, k) is not None}
    return base.model_copy(update=chosen)


def render(exp: catalog.Experiment, opts: Options) -> list[Script]:
    """The sbatch script(s) of an experiment: one job, or an array job and its dependent merge job.
    Every task's config is validated here, so a bad override fails before anything is submitted."""
    res = resources(exp, opts)
    out = io.output_root(opts.output_dir).resolve()
    overrides = [*opts.overrides, *([f"train.deepspeed={opts.deepspeed}"] if opts.deepspeed else [])]
    job = _Job(exp, opts, res, out)
    if not opts.array:
        run_id = _run_id(exp, opts.profile, overrides)
        return [job.script(run_id, job.run_block(run_id, overrides))]
    if exp.spec.array is None:
        raise UserError(f"experiment '{exp.name}' has no `array:` section; submit it without --array")
    if job.procs > 1 or res.nodes > 1:
        raise UserError("array tasks run one process on one node; drop --nodes/--procs-per-node or --array")
    tasks = [[*overrides, *_as_overrides(t)] for t in exp.spec.array.task_overrides(opts.profile)]
    ids = [_run_id(exp, opts.profile, t) for t in tasks]
    name = f"{opts.profile or 'default'}-array-{io.sha256_text(' '.join(ids))[:10]}"
    cases = [f"    {i}) RUN_ID={rid}; TASK=({shlex.join(t[len(overrides):])}) ;;" for i, (rid, t) in enumerate(zip(ids, tasks, strict=True))]
    array = ['case "$SLURM_ARRAY_TASK_ID" in', *cases, "esac",
             *job.run_block("$RUN_ID", [*overrides, _Raw('"${TASK[@]}"')])]
    merge = job.summary(name, ids, tasks)
    if exp.spec.array.merge is not None:
        merge_overrides = [*overrides, *_as_overrides(exp.spec.array.merge)]
        merge += job.run_block(_run_id(exp, opts.profile, merge_overrides), merge_overrides)
    return [job.script(name, array, array_size=len(tasks)),
            job.script(f"{name}-merge", merge, after=0)]


class _Job:
    """What every script of one submission shares: header, environment and launch line."""

    def __init__(self, exp: catalog.Experiment, opts: Options, res: catalog.Resources, out: Path):
        self.exp, self.opts, self.res, self.out = exp, opts, res, out
        self.logs = out / exp.name / "slurm"
        self.procs = opts.procs_per_node or max(res.gpus_per_node, 1)
        self.distributed = res.nodes > 1 or self.procs > 1
        recipe = registry.get(exp.spec.recipe)
        self.resume = "--resume" if recipe.supports_resume else "--force"
        if self.distributed and not recipe.supports_distributed:
            raise UserError(f"recipe '{exp.spec.recipe}' runs in one process: ask for one node and one process "
                            "per node (--nodes 1 --procs-per-node 1), or split it with --array")
        if opts.runtime == "apptainer":
            variant = "cuda" if res.gpus_per_node else "cpu"
            self.sif = str(Path(opts.sif or containers.archive_paths(containers.__version__, variant)[1]).resolve())
            self.hf_cache = containers.host_hf_cache()

    def script(self, name: str, body: list[str], *, array_size: int | None = None, after: int | None = None) -> Script:
        r, job = self.res, f"{self.exp.name.replace('/', '-')}{'-merge' if after is not None else ''}"
        header = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={r.nodes}",
                  "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={r.cpus_per_task}",
                  f"#SBATCH --mem={r.mem}", f"#SBATCH --time={r.time}"]
        header += [f"#SBATCH --gpus-per-node={r.gpus_per_node}"] if r.gpus_per_node else []
        header += [f"#SBATCH --partition={self.opts.partition}"] if self.opts.partition else []
        header += [f"#SBATCH --array=0-{array_size - 1}"] if array_size else []
        header += [f"#SBATCH --output={self.logs}/{name}.{'%A_%a' if array_size else '%j'}.log"]
        what = f"{self.exp.name}" + (f", profile {self.opts.profile}" if self.opts.profile else "")
        header += [f"# {what}: rendered by `invoke slurm`; resubmit with `sbatch {self.logs}/{name}.sbatch`",
                   "set -euo pipefail"]
        return Script(self.logs / f"{name}.sbatch", "\n".join([*header, *self._environment(), *body]) + "\n", after)

    def _environment(self) -> list[str]:
        if self.opts.runtime == "local":
            venv = Path(self.opts.venv)
            lines = [f"source {shlex.quote(str(venv / 'bin' / 'activate'))}"]
            if self.distributed and not self.res.gpus_per_node:
                lines.append("export ACCELERATE_USE_CPU=true  # several processes without GPUs: gloo on CPU")
            return lines
        lines = [f"mkdir -p {shlex.quote(str(self.out))} {shlex.quote(self.hf_cache)}"]
        lines += [f'if [ -n "${{{s}:-}}" ]; then export APPTAINERENV_{s}="${s}"; fi' for s in containers.SECRETS]
        if self.distributed and not self.res.gpus_per_node:
            lines.append("export APPTAINERENV_ACCELERATE_USE_CPU=true  # several processes without GPUs: gloo on CPU")
        return lines

    def run_block(self, run_id: str, overrides: list[str]) -> list[str]:
        """Skip the run if its directory exists (it finished), else run it (resuming an incomplete one)."""
        done = f"{self.out}/{self.exp.name}/{run_id}"
        args = ["run", self.exp.name, *overrides, *(["--profile", self.opts.profile] if self.opts.profile else []),
                "--output-dir", self._outputs(), "--run-id", _Raw(run_id), self.resume]
        return [f'if [ -d "{done}" ]; then', f'    echo "{done} is finished: skipped"', "else",
                *(f"    {line}" for line in self._launch(args)), "fi"]

    def summary(self, name: str, run_ids: list[str], tasks: list[list[str]]) -> list[str]:
        plan = json.dumps([{"run_id": r, "overrides": t} for r, t in zip(run_ids, tasks, strict=True)])
        return self._launch(["-m", "llmrepro.launch.slurm", "summarize", f"{self._outputs()}/{self.exp.name}",
                             f"slurm/{name}.summary.json", plan], program=["python"])

    def _outputs(self) -> str:
        return str(self.out) if self.opts.runtime == "local" else containers.OUTPUTS

    def _launch(self, args: list[str], program: list[str] | None = None) -> list[str]:
        """`llmrepro ARGS` (or `PROGRAM ARGS`), through srun + torchrun and/or apptainer."""
        distributed = self.distributed and program is None
        if program is None:
            program = ["llmrepro"]
        if distributed:
            program = ["torchrun", _Raw("--nnodes=$SLURM_JOB_NUM_NODES"), f"--nproc-per-node={self.procs}",
                       _Raw("--rdzv-id=$SLURM_JOB_ID"), "--rdzv-backend=c10d",
                       _Raw('--rdzv-endpoint="$RDZV_ENDPOINT"'), "-m", "llmrepro.cli"]
        if self.opts.runtime == "apptainer":
            # `apptainer run` starts the SIF's runscript, llmrepro; any other program needs `apptainer exec`
            runscript = program == ["llmrepro"]
            program = containers.apptainer_command(self.sif, [] if runscript else program, output_dir=str(self.out),
                                                   hf_cache=self.hf_cache, gpus=bool(self.res.gpus_per_node),
                                                   verb="run" if runscript else "exec")
        line = " ".join(map(_quote, [*program, *args]))
        if not distributed:
            return [line]
        head = 'RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' \
               f':$(({RDZV_PORT} + SLURM_JOB_ID % 1000))"'
        return [head, f"srun --ntasks-per-node=1 {line}"]


class _Raw(str):
    """A word the job's shell expands (`$RUN_ID`, `"${TASK[@]}"`): written without quoting."""


def _quote(word: str) -> str:
    return word if isinstance(word, _Raw) else shlex.quote(word)


def _as_overrides(values: dict) -> list[str]:
    """{'a.b': 1} -> ['a.b=1']; values as JSON, which the override parser reads back as YAML."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def _run_id(exp: catalog.Experiment, profile: str | None, overrides: list[str]) -> str:
    return exp.run_spec(profile, overrides).default_run_id


def require_slurm() -> None:
    """A one-line UserError unless sbatch exists and a controller answers."""
    if not shutil.which("sbatch"):
        raise UserError("no SLURM here: sbatch is not installed; submit from a cluster login node "
                        "(or start a test cluster: bash scripts/slurm-cluster.sh start)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        why = (ping.stdout or ping.stderr).strip().splitlines()
        raise UserError(f"no SLURM controller reachable (scontrol ping: {why[0] if why else 'no answer'}); "
                        "check SLURM_CONF (or start a test cluster: bash scripts/slurm-cluster.sh start)")


def submit(scripts: list[Script]) -> list[str]:
    """Save and `sbatch --parsable` each script (a dependent one after its predecessor); returns the job ids.
    The job inherits the submitting environment, plus HF_TOKEN/WANDB_API_KEY from `.env` if set there."""
    require_slurm()
    _, secrets = containers.secrets("local")
    ids: list[str] = []
    for script in scripts:
        script.path.parent.mkdir(parents=True, exist_ok=True)
        script.path.write_text(script.text)
        cmd = ["sbatch", "--parsable"]
        if script.after is not None:
            cmd += [f"--dependency=afterok:{ids[script.after]}", "--kill-on-invalid-dep=yes"]
        done = subprocess.run([*cmd, str(script.path)], capture_output=True, text=True,
                              env={**os.environ, **secrets})
        if done.returncode != 0:
            raise UserError(f"sbatch {script.path}: {done.stderr.strip().splitlines()[-1]}")
        ids.append(done.stdout.strip().split(";")[0])
    return ids


def launch(experiment: str, *, dry_run: bool = False, **kwargs) -> str:
    """What `invoke slurm` does: render the experiment's script(s), then print them (dry run) or submit them."""
    scripts = render(catalog.load(experiment), options(**kwargs))
    if dry_run:
        return "\n".join(f"# --- {s.path}\n{s.text}" for s in scripts)
    ids = submit(scripts)
    return "\n".join(f"submitted job {i}: {s.path}" + (f" (after {ids[s.after]} succeeds)" if s.after is not None else "")
                     for i, s in zip(ids, scripts, strict=True))


def jobs(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` of a job (an array job lists its tasks): one dict of fields per job or task."""
    require_slurm()
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], capture_output=True, text=True)
    if shown.returncode != 0:
        raise UserError(f"job {job_id} is not known to the controller (finished jobs are forgotten after "
                        "MinJobAge); its log is under <output root>/<experiment>/slurm/")
    return [dict(word.split("=", 1) for word in line.split() if "=" in word)
            for line in shown.stdout.splitlines() if line.strip()]


def status(job_id: str) -> str:
    """A table of the job (or array tasks): id, name, state, reason, run time, log."""
    rows = [[j["JobId"] + (f"_{j['ArrayTaskId']}" if "ArrayTaskId" in j else ""), j.get("JobName", ""),
             j.get("JobState", ""), j.get("Reason", ""), j.get("RunTime", ""), j.get("StdOut", "")]
            for j in jobs(job_id)]
    return io.table(rows, ["job", "name", "state", "reason", "time", "log"])


def summarize(exp_dir: str, dest: str, plan: str) -> None:
    """Write `dest` (under exp_dir): each array task's overrides, run directory and metrics."""
    root = Path(exp_dir)
    rows = [{**t, "metrics": io.read_json(root / t["run_id"] / "metrics.json")} for t in json.loads(plan)]
    io.write_json(root / dest, {"tasks": rows})


def main(argv: list[str]) -> int:
    """`python -m llmrepro.launch.slurm summarize EXP_DIR DEST PLAN`: what a merge job runs first."""
    if len(argv) != 4 or argv[0] != "summarize":
        print("usage: python -m llmrepro.launch.slurm summarize EXP_DIR DEST PLAN_JSON", file=sys.stderr)
        return 2
    summarize(*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
