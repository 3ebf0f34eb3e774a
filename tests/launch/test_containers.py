"""Container commands: exact docker/podman/apptainer argv, the invoke tasks' dry runs and errors,
hadolint + actionlint, (marked `container`) a real podman build and smoke run of the CPU image, and (marked `slow`
too, `invoke test --slow`) the CUDA image: built, self-checked and run without a GPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmrepro import __version__
from llmrepro.core import io, provenance
from llmrepro.core.errors import UserError
from llmrepro.launch import containers as ct

ROOT = Path(__file__).resolve().parents[2]
SMOKE_EXPERIMENT = "instruct/dolly-pythia-2.8b"
CUDA_BASE = ct.VARIANTS["cuda"].base_image


def test_docker_run_command():
    argv = ct.run_command("docker", "llmrepro:0.1.0-cpu", ["run", "a/b", "--profile", "smoke"],
                          output_dir="/h/out", hf_cache="/h/hf", uid=1000, gid=100, secret_names=("HF_TOKEN",))
    assert argv == ["docker", "run", "--rm", "--user", "1000:100", "-v", "/h/out:/outputs",
                    "-v", "/h/hf:/cache/huggingface", "-e", "HF_TOKEN", "llmrepro:0.1.0-cpu",
                    "run", "a/b", "--profile", "smoke"]


def test_docker_run_command_gpus_no_network():
    argv = ct.run_command("docker", "llmrepro:0.1.0-cu130-torch2.13", ["smoke"], output_dir="/o", hf_cache="/c",
                          uid=0, gid=0, gpus=True, network="none")
    assert argv == ["docker", "run", "--rm", "--user", "0:0", "--gpus", "all", "--network", "none",
                    "-v", "/o:/outputs", "-v", "/c:/cache/huggingface", "llmrepro:0.1.0-cu130-torch2.13", "smoke"]


def test_podman_run_command_rootless_gpus_shell():
    argv = ct.run_command("podman", "llmrepro:0.1.0-cpu", [], output_dir="/o", hf_cache="/c", uid=1000, gid=1000,
                          gpus=True, rootless=True, interactive=True, entrypoint="bash")
    assert argv == ["podman", "run", "--rm", "-it", "--userns=keep-id", "--user", "1000:1000",
                    "--device", "nvidia.com/gpu=all", "-v", "/o:/outputs", "-v", "/c:/cache/huggingface",
                    "--entrypoint", "bash", "llmrepro:0.1.0-cpu"]


def test_apptainer_commands():
    run = ct.apptainer_command("dist/x.sif", ["smoke"], output_dir="/o", hf_cache="/c", gpus=True)
    assert run == ["apptainer", "run", "--containall", "--cleanenv", "--nv", "--bind", "/o:/outputs",
                   "--bind", "/c:/cache/huggingface", "dist/x.sif", "smoke"]
    run_exec = ct.apptainer_command("dist/x.sif", ["torchrun", "-m", "llmrepro.cli"], output_dir="/o", hf_cache="/c",
                                    verb="exec")
    assert run_exec == ["apptainer", "exec", "--containall", "--cleanenv", "--bind", "/o:/outputs",
                        "--bind", "/c:/cache/huggingface", "dist/x.sif", "torchrun", "-m", "llmrepro.cli"]
    shell = ct.apptainer_command("dist/x.sif", ["ignored"], output_dir="/o", hf_cache="/c", verb="shell")
    assert shell == ["apptainer", "shell", "--containall", "--cleanenv", "--bind", "/o:/outputs",
                     "--bind", "/c:/cache/huggingface", "dist/x.sif"]


def test_build_command_and_tags():
    argv = ct.build_command("docker", "cuda", version="0.1.0", commit="0123456789abcdef", dirty=False,
                            lock_sha256="ab" * 32, ca_file="/etc/ca.pem", wheels="/opt/wheels")
    assert argv == [
        "docker", "build", "-f", "docker/Dockerfile", "--target", "final",
        "-t", "llmrepro:0.1.0-cu130-torch2.13", "-t", "llmrepro:0.1.0-cu130-torch2.13-0123456",
        "--build-arg", "VARIANT=cuda", "--build-arg", f"BASE_IMAGE={CUDA_BASE}",
        "--build-arg", "VERSION=0.1.0", "--build-arg", "GIT_COMMIT=0123456789abcdef",
        "--build-arg", f"LOCK_SHA256={'ab' * 32}", "--build-arg", "IMAGE_ID=llmrepro:0.1.0-cu130-torch2.13-0123456",
        "--secret", "id=ca,src=/etc/ca.pem", "--build-context", "wheels=/opt/wheels", "."]
    assert ct.image_tags("0.1.0", "cpu", None, dirty=True) == ["llmrepro:0.1.0-cpu", "llmrepro:0.1.0-cpu-nogit-dirty"]


def test_save_and_sif_commands():
    assert ct.save_command("podman", "llmrepro:0.1.0-cpu", "dist/a.oci.tar") == [
        "podman", "save", "--format", "oci-archive", "-o", "dist/a.oci.tar", "llmrepro:0.1.0-cpu"]
    assert ct.save_command("docker", "llmrepro:0.1.0-cpu", "dist/a.tar") == [
        "docker", "save", "-o", "dist/a.tar", "llmrepro:0.1.0-cpu"]
    assert ct.sif_command("dist/a.oci.tar", "dist/a.sif", "sha256:00", "oci-archive") == [
        "apptainer", "build", "--force", "--build-arg", "BOOTSTRAP=oci-archive", "--build-arg", "FROM=dist/a.oci.tar",
        "--build-arg", "IMAGE_DIGEST=sha256:00", "dist/a.sif", "apptainer/llmrepro.def"]


def test_secrets_by_name_from_env_and_dotenv(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport WANDB_API_KEY='from-file'\nHF_TOKEN=from-file\nOTHER=x\n")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    names, env = ct.secrets("docker", str(dotenv))
    assert sorted(names) == ["HF_TOKEN", "WANDB_API_KEY"]
    assert env == {"WANDB_API_KEY": "from-file", "HF_TOKEN": "from-env"}
    _, env = ct.secrets("apptainer", str(dotenv))
    assert env == {"APPTAINERENV_WANDB_API_KEY": "from-file", "APPTAINERENV_HF_TOKEN": "from-env"}


def test_missing_engine_and_sif_are_user_errors(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="podman is not installed"):
        ct.detect_engine("podman")
    with pytest.raises(UserError, match="no container engine"):
        ct.detect_engine()
    with pytest.raises(UserError, match="apptainer is not installed"):
        ct.require_sif("dist/none.sif", "cpu")
    with pytest.raises(UserError, match="unknown engine 'rkt'"):
        ct.detect_engine("rkt")


def _invoke(*args: str, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ct.SECRETS}
    env.update(LLMREPRO_OUTPUT_DIR=str(tmp_path / "out"), HF_HOME=str(tmp_path / "hf"))
    invoke = [sys.executable, "-m", "invoke"]
    return subprocess.run([*invoke, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check)


def test_invoke_run_dry_run_docker_and_apptainer(tmp_path):
    out, hf = tmp_path / "out", tmp_path / "hf"
    docker = _invoke("run", SMOKE_EXPERIMENT, "--profile", "smoke", "--runtime", "docker", "--dry-run",
                     tmp_path=tmp_path).stdout.strip()
    assert docker == (f"docker run --rm --user {os.getuid()}:{os.getgid()} -v {out}:/outputs "
                      f"-v {hf}:/cache/huggingface llmrepro:{__version__}-cpu run {SMOKE_EXPERIMENT} --profile smoke")
    apptainer = _invoke("smoke", "--runtime", "apptainer", "--gpus", "--dry-run", tmp_path=tmp_path).stdout.strip()
    assert apptainer == (f"apptainer run --containall --cleanenv --nv --bind {out}:/outputs "
                         f"--bind {hf}:/cache/huggingface dist/llmrepro-{__version__}-cu130-torch2.13.sif smoke")
    assert not out.exists()  # a dry run touches nothing


def test_invoke_bad_input_is_one_line_exit_2(tmp_path):
    result = _invoke("build", "--variant", "gpu", "--engine", "docker", "--dry-run", tmp_path=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown variant 'gpu': choose one of cpu, cuda"
    result = _invoke("run", SMOKE_EXPERIMENT, "--runtime", "lxc", "--dry-run", tmp_path=tmp_path, check=False)
    assert result.returncode == 2
    assert "unknown runtime 'lxc'" in result.stderr


@pytest.mark.parametrize("cmd", [["hadolint", "docker/Dockerfile"], ["actionlint"]])
def test_linters_pass(cmd):
    tool = Path(sys.executable).parent / cmd[0]  # the venv's own, whether or not it is activated
    result = subprocess.run([str(tool), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.container
@pytest.mark.timeout(3600)
def test_podman_build_smoke_and_cached_rebuild(tmp_path, monkeypatch):
    """Build the CPU image, run a smoke experiment in it offline, then rebuild after a source-only change."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (sudo bash scripts/setup-podman.sh)")
    subprocess.run([sys.executable, "-m", "invoke", "build", "--variant", "cpu", "--engine", "podman"],
                   cwd=ROOT, check=True)
    image = f"llmrepro:{__version__}-cpu"
    image_id = subprocess.run(["podman", "image", "inspect", "--format", '{{index .Config.Labels "io.llmrepro.image"}}',
                               image], capture_output=True, text=True, check=True).stdout.strip()
    assert image_id.startswith(f"{image}-")

    out = tmp_path / "out"  # LLMREPRO_OUTPUT_DIR of _invoke
    _invoke("smoke", "--runtime", "podman", "--only", SMOKE_EXPERIMENT, tmp_path=tmp_path)
    sys.path.insert(0, str(ROOT / "scripts"))
    from check_outputs import problems

    assert problems(out, image_id, io.sha256_file(ROOT / "requirements/cpu.lock")) == []

    # Source-only change in a copy of the tree: every step before the source COPY must come from the cache.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    copy = tmp_path / "tree"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    with open(copy / "src/llmrepro/containers.py", "a") as f:
        f.write("# a source-only change\n")
    monkeypatch.chdir(copy)
    argv, _ = ct.prepare_build("podman", "cpu")
    argv = [a if not a.startswith(f"{image}") else "llmrepro-test:rebuild" for a in argv]
    log = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    subprocess.run(["podman", "rmi", "llmrepro-test:rebuild"], capture_output=True)
    steps = re.findall(r"STEP \d+/\d+: (\w+) (.*)\n(--> Using cache)?", log)
    deps = [s for s in steps if "requirements.lock" in s[1] or "selfcheck" in s[1]]
    assert deps and all(cached for *_, cached in deps), log


CUDA_ARCHES = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"  # docker/Dockerfile's CUDA_ARCHES: torch 2.13.0 cu130's
NO_GPU = "llmrepro: error: projection.projector=cuda needs a CUDA GPU; none is available (use projector: basic)"


def test_dockerfile_declares_the_arches_the_tests_expect():
    assert f'ARG CUDA_ARCHES="{CUDA_ARCHES}"' in (ROOT / "docker/Dockerfile").read_text()


def test_both_variants_build_on_the_same_base(monkeypatch):
    monkeypatch.setattr(ct, "_succeeds", lambda cmd: False)  # no local base image: the pinned default
    monkeypatch.setattr(ct, "pip_setting", lambda name: None)
    args = {v: [a for a in ct.prepare_build("podman", v)[0] if a.startswith("BASE_IMAGE=")] for v in ct.VARIANTS}
    assert args["cpu"] == args["cuda"] == [f"BASE_IMAGE={ct.BASE_IMAGE}"] and "@sha256:" in ct.BASE_IMAGE
    monkeypatch.setattr(ct, "_succeeds", lambda cmd: cmd[-1] == ct.LOCAL_BASE)  # setup-podman.sh's base is there
    for v in ct.VARIANTS:
        argv, notes = ct.prepare_build("podman", v)
        assert f"BASE_IMAGE={ct.LOCAL_BASE}" in argv and any(ct.LOCAL_BASE in n for n in notes)


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.timeout(7200)
def test_cuda_image_builds_self_checks_and_runs_without_a_gpu(tmp_path):
    """Build the CUDA image (no GPU needed; most of the time goes into compiling fast_jl for six arches), unless
    LLMREPRO_CUDA_IMAGE names one built from the same Dockerfile (the images workflow's buildx build), then, in it
    with no network: the self-check; fast_jl imports; the cuda projector stops for want of a GPU with one line,
    not for want of fast_jl; a smoke run records the cuda stack, which is the CPU lock's except torch's build."""
    engine = ct.detect_engine()
    image = os.environ.get("LLMREPRO_CUDA_IMAGE")
    if not image:
        subprocess.run([sys.executable, "-m", "invoke", "build", "--variant", "cuda", "--engine", engine],
                       cwd=ROOT, check=True)
        image = ct.image_tags(__version__, "cuda", None)[0]
    out, hf = tmp_path / "out", tmp_path / "hf"
    out.mkdir()
    hf.mkdir()

    def in_image(*args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
        argv = ct.run_command(engine, image, list(args), output_dir=str(out), hf_cache=str(hf), uid=os.getuid(),
                              gid=os.getgid(), network="none", entrypoint=entrypoint)
        return subprocess.run(argv, capture_output=True, text=True, timeout=1800)

    check = in_image("/opt/llmrepro/selfcheck.py", "/opt/llmrepro/requirements.lock", "--cuda", "13.0",
                     "--arch", CUDA_ARCHES, entrypoint="python")
    assert check.returncode == 0, check.stderr
    assert f"GPU code for {CUDA_ARCHES} in torch, fast_jl and libbitsandbytes_cuda130.so" in check.stdout
    assert "NVIDIA driver >= 580" in check.stdout

    kernels = in_image("-c", "import torch, fast_jl; print(sorted(k for k in dir(fast_jl) if k.startswith('project')))",
                       entrypoint="python")
    assert kernels.returncode == 0, kernels.stderr
    assert "project_rademacher_8" in kernels.stdout and "project_normal_32" in kernels.stdout

    cuda = in_image("run", "gradients/olmo2-7b-sft-rademacher16384-train", "--profile", "smoke",
                    "projection.projector=cuda")
    assert cuda.returncode == 2 and "Traceback" not in cuda.stderr
    assert cuda.stderr.strip().splitlines()[-1] == NO_GPU

    smoke = in_image("run", SMOKE_EXPERIMENT, "--profile", "smoke")
    assert smoke.returncode == 0, smoke.stderr
    [path] = (out / SMOKE_EXPERIMENT).rglob("manifest.json")
    stack = json.loads(path.read_text())["stack"]
    assert (stack["variant"], stack["lock"], stack["drift"]) == ("cuda", "/opt/llmrepro/requirements.lock", [])
    assert stack["lock_sha256"] == io.sha256_file(ROOT / "requirements/cuda.lock")
    assert stack["torch"] == "2.13.0+cu130"
    local = dict(provenance.stack(), drift=[])  # this venv, installed from cpu.lock
    assert provenance.compare_stacks(local, stack) == (
        f"stack: the same pinned packages except torch's build ({local['torch']} on cpu, 2.13.0+cu130 on cuda) "
        "and the CUDA libraries")
