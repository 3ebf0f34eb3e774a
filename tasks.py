"""invoke tasks: thin wrappers that call the `llmrepro` CLI and the test/lint tools.

    invoke setup            # install the locked dependencies and the package into the active environment
    invoke test             # the test suite
    invoke lint             # ruff, plus hadolint/actionlint on the container and workflow files
    invoke list             # the experiment catalog
    invoke run EXP -p smoke # one experiment
    invoke smoke            # every experiment's smoke profile
    invoke build --variant cpu                     # the OCI image (docker or podman, auto-detected)
    invoke run EXP -p smoke --runtime podman       # one experiment in that image (--dry-run prints the command)
    invoke save; invoke sif                        # OCI archive, then the Apptainer SIF made from it
    invoke lock                                    # regenerate requirements/*.lock (one resolution)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys

from invoke import Exit, task

PYTHON = sys.executable  # the interpreter running invoke: the project's venv, activated or not
LLMREPRO = [PYTHON, "-m", "llmrepro.cli"]
BIN = shlex.quote(os.path.dirname(PYTHON))  # the venv's tools (ruff, hadolint, actionlint), activated or not


def _llmrepro(c, *args: str, pty: bool = False):
    return c.run(shlex.join([*LLMREPRO, *args]), echo=True, pty=pty)


@task(help={"lock": "requirements lock file to install (default requirements/cpu.lock)"})
def setup(c, lock="requirements/cpu.lock"):
    """Install the locked dependencies, then the package itself (editable, no dependency resolution)."""
    if sys.version_info[:2] != (3, 11):
        raise Exit(f"error: the locks are resolved for Python 3.11; this is {sys.version.split()[0]}", code=2)
    c.run(shlex.join([PYTHON, "-m", "pip", "install", "--require-hashes", "-r", lock]), echo=True)
    c.run(shlex.join([PYTHON, "-m", "pip", "install", "--no-deps", "-e", "."]), echo=True)


@task(help={"k": "only tests matching this pytest -k expression", "x": "stop at the first failure",
            "slow": "also the tests marked slow (minutes: the CUDA image build)"})
def test(c, k="", x=False, slow=False):
    """Run the test suite (offline; tiny models are built into a temporary cache)."""
    args = [PYTHON, "-m", "pytest", "-q"] + (["-k", k] if k else []) + (["-x"] if x else []) \
        + (["--slow"] if slow else [])
    c.run(" ".join(map(shlex.quote, args)), echo=True, pty=False)


@task
def lint(c):
    """ruff on the Python code, hadolint on the Dockerfile, actionlint on the workflows."""
    c.run(f"{BIN}/ruff check src tests benchmarks tasks.py", echo=True)
    c.run(f"{BIN}/hadolint docker/Dockerfile", echo=True)
    c.run(f"{BIN}/actionlint", echo=True)


@task(name="list")
def list_(c):
    """The experiment catalog."""
    _llmrepro(c, "list")


RUNTIME_HELP = {"runtime": "local | docker | podman | apptainer (default local)",
                "gpus": "use the GPUs (the cuda image; --gpus / CDI device / --nv)",
                "dry_run": "print the exact container command instead of running it"}


@task(help={"experiment": "experiment name, e.g. instruct/dolly-pythia-2.8b", "profile": "profile, e.g. smoke",
            "override": "key=value (repeatable)", "force": "replace a finished run", "resume": "continue a run",
            **RUNTIME_HELP},
      iterable=["override"])
def run(c, experiment, profile=None, override=None, force=False, resume=False, runtime="local", gpus=False,
        dry_run=False):
    """Run one experiment locally or in the container image (outputs go to the host's output root)."""
    args = ["run", experiment] + (["--profile", profile] if profile else []) + (["--force"] if force else []) \
        + (["--resume"] if resume else []) + list(override or [])
    _llmrepro_in(c, runtime, args, gpus=gpus, dry_run=dry_run)


@task(help={"only": "glob of experiments to include (repeatable)", **RUNTIME_HELP}, iterable=["only"])
def smoke(c, only=None, runtime="local", gpus=False, dry_run=False):
    """Every experiment's smoke profile, then a summary table (in a container: with no network)."""
    args = ["smoke", *[a for g in (only or []) for a in ("--only", g)]]
    _llmrepro_in(c, runtime, args, gpus=gpus, dry_run=dry_run, network="none")


# --- containers: the commands themselves are rendered by llmrepro.containers ---------------------------------


@contextlib.contextmanager
def _containers():
    """Yield llmrepro.containers (imported on use, so `invoke setup` works before the package is installed);
    a UserError becomes one line on stderr and exit code 2, as in the CLI."""
    from llmrepro.core.errors import UserError
    from llmrepro.launch import containers

    try:
        yield containers
    except UserError as err:
        raise Exit(f"error: {err}", code=2) from None


def _exec(c, argv: list[str], dry_run: bool, env: dict | None = None, pty: bool = False):
    """Print the exact command; run it unless dry_run. `env` (secrets) is passed, never printed."""
    if dry_run:
        print(shlex.join(argv))
        return
    c.run(shlex.join(argv), echo=True, env=env or {}, pty=pty)


def _llmrepro_in(c, runtime: str, args: list[str], *, gpus=False, dry_run=False, network=None):
    if runtime == "local":
        return _exec(c, [*LLMREPRO, *args], dry_run)
    with _containers() as ct:
        argv, env = ct.prepare_run(runtime, args, gpus=gpus, network=network, check=not dry_run)
    _exec(c, argv, dry_run, env)


@task(help={"variant": "cpu | cuda", "engine": "docker | podman (default: auto-detected)",
            "base_image": "override the base image (default: the variant's pinned one)",
            "ca_cert": "extra CA bundle for pip (default: the host pip's `cert`)",
            "wheels": "local wheel folder for pip (default: the host pip's `find-links`)",
            "dry_run": "print the build command instead of running it"})
def build(c, variant="cpu", engine=None, base_image=None, ca_cert=None, wheels=None, dry_run=False):
    """Build the image llmrepro:<version>-<variant>[-<git sha>] from docker/Dockerfile."""
    with _containers() as ct:
        engine = engine if dry_run and engine else ct.detect_engine(engine)
        argv, notes = ct.prepare_build(engine, variant, base_image=base_image, ca_file=ca_cert, wheels=wheels)
    for note in notes:
        print(f"build: {note}")
    _exec(c, argv, dry_run)


@task(help={"variant": "cpu | cuda", "engine": "docker | podman (default: auto-detected)",
            "dry_run": "print the command instead of running it"})
def save(c, variant="cpu", engine=None, dry_run=False):
    """Write the built image as an OCI archive under dist/ (the input of `invoke sif`)."""
    with _containers() as ct:
        engine = engine if dry_run and engine else ct.detect_engine(engine)
        image = ct.image_tags(ct.__version__, variant, None)[0]
        if not dry_run:
            ct.require_image(engine, image, variant)
            c.run("mkdir -p dist")
    _exec(c, ct.save_command(engine, image, ct.archive_paths(ct.__version__, variant)[0]), dry_run)


@task(help={"variant": "cpu | cuda", "engine": "engine that built the image, for its digest (default: auto)",
            "dry_run": "print the command instead of running it"})
def sif(c, variant="cpu", engine=None, dry_run=False):
    """Build the Apptainer SIF from the archive of `invoke save`; its %labels carry the image digest."""
    with _containers() as ct:
        engine = engine if dry_run and engine else ct.detect_engine(engine)
        archive, sif_path = ct.archive_paths(ct.__version__, variant)
        image = ct.image_tags(ct.__version__, variant, None)[0]
        digest = "sha256:<image id>" if dry_run else ct.image_id(engine, image)
        bootstrap = "oci-archive" if engine == "podman" else "docker-archive"
    _exec(c, ct.sif_command(archive, sif_path, digest, bootstrap), dry_run)


@task(help={"runtime": "docker | podman | apptainer (default: the detected engine)", "gpus": RUNTIME_HELP["gpus"],
            "dry_run": RUNTIME_HELP["dry_run"]})
def shell(c, runtime=None, gpus=False, dry_run=False):
    """An interactive shell in the image, with the same mounts as `invoke run`."""
    with _containers() as ct:
        argv, env = ct.prepare_run(runtime or ct.detect_engine(), [], gpus=gpus, shell=True, check=not dry_run)
    _exec(c, argv, dry_run, env, pty=True)


LOCKS = "requirements"


def _pins(lock_file: str, out: str, drop: tuple[str, ...] = ()) -> None:
    """Write `name==version` of every pin of `lock_file` (less the names in `drop`) as a constraints file."""
    from pathlib import Path

    from llmrepro.core.provenance import lock_pins

    pins = [f"{name}=={version}" for name, version in lock_pins(Path(lock_file).read_text()).items() if name not in drop]
    Path(out).write_text("\n".join(pins) + "\n")


@task(help={"upgrade": "move every pin to the newest allowed version (default: keep pins, add what is new)"})
def lock(c, upgrade=False):
    """Regenerate requirements/{cpu,cuda,cuda-build,models}.lock in one resolution for Python 3.11, hash-pinned, with uv.

    cpu.lock is resolved first (torch's CPU build from the local wheel folder, dev tools); its pins except torch
    constrain cuda.lock (PyPI's CUDA torch and its nvidia-* wheels), so the two locks agree on every package they
    share (tests/launch/test_locks.py). cuda-build.lock pins the CUDA image's build-only inputs (fast_jl's sdist,
    the CUDA compiler wheels) to the versions of cuda.lock; models.lock the wheels the images carry model files in.
    """
    common = f"{BIN}/uv pip compile --no-python-downloads --generate-hashes --python-version 3.11 " \
             "--python-platform x86_64-manylinux_2_28 --custom-compile-command 'invoke lock'" \
             + (" --upgrade" if upgrade else "")
    with _containers() as ct:
        wheels = ct.pip_setting("find-links")
    find_links = f" --find-links {shlex.quote(wheels)} --no-emit-find-links" if wheels else ""
    # The constraint files keep stable repo-relative names: uv writes them into the locks' `# via` comments.
    cpu_pins, cuda_pins = f"{LOCKS}/cpu-pins.txt", f"{LOCKS}/cuda-pins.txt"
    try:
        c.run(f"{common} pyproject.toml --extra dev{find_links} -o {LOCKS}/cpu.lock", echo=True)
        _pins(f"{LOCKS}/cpu.lock", cpu_pins, drop=("torch",))
        c.run(f"{common} pyproject.toml --extra dev -c {cpu_pins} -o {LOCKS}/cuda.lock", echo=True)
        _pins(f"{LOCKS}/cuda.lock", cuda_pins)
        c.run(f"{common} {LOCKS}/cuda-build.in -c {cuda_pins} -o {LOCKS}/cuda-build.lock", echo=True)
        c.run(f"{common} --no-deps {LOCKS}/models.in -o {LOCKS}/models.lock", echo=True)
    finally:
        for path in (cpu_pins, cuda_pins):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# --- SLURM: scripts are rendered and submitted by llmrepro.slurm ---------------------------------------------


@task(help={"experiment": "experiment name, e.g. instruct/dolly-pythia-2.8b", "profile": "profile, e.g. smoke",
            "runtime": "local (the project's environment) | apptainer (the SIF)", "override": "key=value (repeatable)",
            "array": "one array task per slice of the experiment's `array:` section, then a dependent merge job",
            "nodes": "nodes (default: the experiment's resources)", "gpus_per_node": "GPUs per node",
            "procs_per_node": "torchrun processes per node (default: GPUs per node, or 1)",
            "cpus_per_task": "CPUs per node", "mem": "memory per node, e.g. 64G", "time": "time limit, e.g. 04:00:00",
            "partition": "partition", "deepspeed": "zero2 | zero3: train with that shipped DeepSpeed ZeRO config",
            "output_dir": "output root (default $LLMREPRO_OUTPUT_DIR or ./outputs)",
            "sif": "Apptainer image (default: the one `invoke sif` builds)", "dry_run": "print the script(s) only",
            "gpu_mem": "memory per GPU in GiB for the plan (default 80)",
            "no_plan": "submit without `llmrepro plan`'s check that the job fits its GPUs"},
      iterable=["override"])
def slurm(c, experiment, profile=None, runtime="local", override=None, array=False, nodes=None, gpus_per_node=None,
          procs_per_node=None, cpus_per_task=None, mem=None, time=None, partition=None, deepspeed=None,
          output_dir=None, sif=None, dry_run=False, gpu_mem=None, no_plan=False):
    """Plan the job (it is refused if it would run out of memory), then submit it as a SLURM job (an array plus a
    merge job with --array); logs go next to its runs."""
    with _containers():
        from llmrepro.launch import slurm as s

        if not no_plan:
            from llmrepro.core import catalog
            from llmrepro.training.planning import api

            opts = s.options(profile=profile, runtime=runtime, overrides=list(override or []), array=array, nodes=nodes,
                             gpus_per_node=gpus_per_node, procs_per_node=procs_per_node, mem=mem, deepspeed=deepspeed)
            res = s.resources(catalog.load(experiment), opts)
            plan = api.preflight(experiment, profile, [*opts.overrides, *([f"train.deepspeed={deepspeed}"] if deepspeed
                                                                          else [])],
                                 nodes=res.nodes, gpus_per_node=res.gpus_per_node, mem=res.mem,
                                 procs_per_node=opts.procs_per_node or max(res.gpus_per_node, 1),
                                 gpu_mem_gib=float(gpu_mem) if gpu_mem else None)
            if not plan.fits:
                raise Exit(f"refused: {plan.line()} (submit anyway with --no-plan)", code=3)
            print(f"# {plan.line()}")
        print(s.launch(experiment, dry_run=dry_run, profile=profile, runtime=runtime, overrides=list(override or []),
                       array=array, nodes=nodes, gpus_per_node=gpus_per_node, procs_per_node=procs_per_node,
                       cpus_per_task=cpus_per_task, mem=mem, time=time, partition=partition, deepspeed=deepspeed,
                       output_dir=output_dir, sif=sif))


@task(name="slurm-status", help={"job": "job id printed by `invoke slurm`"})
def slurm_status(c, job):
    """State, reason, run time and log of a SLURM job or of each task of an array job."""
    with _containers():
        from llmrepro.launch import slurm as s

        print(s.status(job))
