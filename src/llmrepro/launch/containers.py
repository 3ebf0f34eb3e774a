"""Container commands: build, save and run llmrepro images with docker, podman or apptainer.

The `*_command` functions are pure: they return the exact argv (tested as such, printed by
`--dry-run`). `prepare_build` and `prepare_run` fill them in from the machine (git state, the host
pip's CA and wheel folder, engine, image, secrets); tasks.py wires them to `invoke build|save|sif|
run|shell|smoke`. Missing engines, images and SIFs are UserErrors saying what to run.

Images are tagged `llmrepro:<version>-<suffix>` (moving) and `...-<git short sha>` (fixed, and
recorded in every run manifest through LLMREPRO_IMAGE); `latest` is left to release CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llmrepro import __version__
from llmrepro.core import io
from llmrepro.core.errors import UserError

ENGINES = ("docker", "podman")
RUNTIMES = ("local", "docker", "podman", "apptainer")
SECRETS = ("HF_TOKEN", "WANDB_API_KEY")
REPO = "llmrepro"
# Where the image expects its mounts (docker/Dockerfile).
OUTPUTS, HF_CACHE = "/outputs", "/cache/huggingface"
# Made by scripts/setup-podman.sh on machines that cannot pull from a registry.
LOCAL_BASE = "localhost/llmrepro-base:bookworm"


@dataclass(frozen=True)
class Variant:
    """One image flavour: its tag suffix, lock file and default base image."""

    suffix: str
    lock: str
    base_image: str


# Both variants start from the same digest-pinned Debian bookworm / Python 3.11 base: the CUDA user space comes
# from the hash-pinned nvidia-* wheels of cuda.lock, the driver from the host (docker/Dockerfile).
BASE_IMAGE = "python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b"
VARIANTS = {
    "cpu": Variant("cpu", "requirements/cpu.lock", BASE_IMAGE),
    "cuda": Variant("cu130-torch2.13", "requirements/cuda.lock", BASE_IMAGE),
}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(f"unknown variant '{name}': choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def image_tags(version: str, variant_name: str, commit: str | None, dirty: bool = False) -> list[str]:
    """[moving tag, fixed tag]: `llmrepro:0.1.0-cpu`, `llmrepro:0.1.0-cpu-1a2b3c4[-dirty]`."""
    moving = f"{REPO}:{version}-{variant(variant_name).suffix}"
    fixed = f"{moving}-{(commit or 'nogit')[:7]}{'-dirty' if dirty else ''}"
    return [moving, fixed]


def build_command(engine: str, variant_name: str, *, version: str, commit: str | None, dirty: bool,
                  lock_sha256: str, base_image: str | None = None, ca_file: str | None = None,
                  wheels: str | None = None) -> list[str]:
    """`docker|podman build` of docker/Dockerfile; the CA file and wheel folder never enter the image."""
    v = variant(variant_name)
    tags = image_tags(version, variant_name, commit, dirty)
    cmd = [engine, "build", "-f", "docker/Dockerfile", "--target", "final"]
    for tag in tags:
        cmd += ["-t", tag]
    args = {"VARIANT": variant_name, "BASE_IMAGE": base_image or v.base_image, "VERSION": version,
            "GIT_COMMIT": commit or "unknown", "LOCK_SHA256": lock_sha256, "IMAGE_ID": tags[1]}
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if ca_file:
        cmd += ["--secret", f"id=ca,src={ca_file}"]
    if wheels:
        cmd += ["--build-context", f"wheels={wheels}"]
    return [*cmd, "."]


def run_command(engine: str, image: str, args: list[str], *, output_dir: str, hf_cache: str,
                uid: int, gid: int, gpus: bool = False, rootless: bool = False, network: str | None = None,
                secret_names: tuple[str, ...] = (), interactive: bool = False,
                entrypoint: str | None = None) -> list[str]:
    """`docker|podman run` of `llmrepro ARGS` as the invoking user, outputs and HF cache mounted.

    Secrets are passed by name (`-e HF_TOKEN`): their values come from the caller's environment
    and never appear on the command line. Rootless podman maps the user with `--userns=keep-id`.
    """
    cmd = [engine, "run", "--rm"]
    if interactive:
        cmd += ["-it"]
    if engine == "podman" and rootless:
        cmd += ["--userns=keep-id"]
    cmd += ["--user", f"{uid}:{gid}"]
    if gpus:
        cmd += ["--gpus", "all"] if engine == "docker" else ["--device", "nvidia.com/gpu=all"]
    if network:
        cmd += ["--network", network]
    cmd += ["-v", f"{output_dir}:{OUTPUTS}", "-v", f"{hf_cache}:{HF_CACHE}"]
    for name in secret_names:
        cmd += ["-e", name]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return [*cmd, image, *args]


def host_hf_cache() -> str:
    """The host's Hugging Face cache, mounted into every container run."""
    return str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").resolve())


def apptainer_command(sif: str, args: list[str], *, output_dir: str, hf_cache: str, gpus: bool = False,
                      verb: str = "run") -> list[str]:
    """`apptainer run|exec|shell` isolated from the host (`--containall --cleanenv`): `run` starts the SIF's
    runscript (llmrepro) with `args`, `exec` runs the program `args`, `shell` ignores them. Secrets go
    through APPTAINERENV_* variables (see `secrets`), never on the command line."""
    cmd = ["apptainer", verb, "--containall", "--cleanenv"]
    if gpus:
        cmd += ["--nv"]
    cmd += ["--bind", f"{output_dir}:{OUTPUTS}", "--bind", f"{hf_cache}:{HF_CACHE}", sif]
    return cmd if verb == "shell" else [*cmd, *args]


def save_command(engine: str, image: str, archive: str) -> list[str]:
    """Write `image` as an archive for `sif_command`: OCI from podman; docker's own format (an OCI
    layout too since docker 25) from docker, which apptainer reads as docker-archive."""
    if engine == "podman":
        return ["podman", "save", "--format", "oci-archive", "-o", archive, image]
    return ["docker", "save", "-o", archive, image]


def sif_command(archive: str, sif: str, image_id: str, bootstrap: str,
                definition: str = "apptainer/llmrepro.def") -> list[str]:
    """`apptainer build` of the SIF from a saved archive (`bootstrap`: oci-archive from podman,
    docker-archive from docker); `%labels` record the image's digest."""
    return ["apptainer", "build", "--force", "--build-arg", f"BOOTSTRAP={bootstrap}",
            "--build-arg", f"FROM={archive}", "--build-arg", f"IMAGE_DIGEST={image_id}", sif, definition]


def archive_paths(version: str, variant_name: str, dist: str = "dist") -> tuple[str, str]:
    """(image archive, SIF) file names for one image."""
    stem = f"{dist}/{REPO}-{version}-{variant(variant_name).suffix}"
    return f"{stem}.tar", f"{stem}.sif"


def prepare_build(engine: str, variant_name: str, *, base_image: str | None = None, ca_file: str | None = None,
                  wheels: str | None = None) -> tuple[list[str], list[str]]:
    """(build argv, notes saying which base image, CA and wheel folder were picked and why).

    Unless given, the CA file and wheel folder are the host pip's own (`cert`, `find-links`), and
    either variant uses LOCAL_BASE when the engine has it (a machine that cannot reach Docker Hub).
    """
    notes = []
    variant(variant_name)
    base = base_image or os.environ.get("LLMREPRO_BASE_IMAGE")
    if not base and _succeeds([engine, "image", "inspect", LOCAL_BASE]):
        base = LOCAL_BASE
        notes.append(f"base image {LOCAL_BASE} (made by scripts/setup-podman.sh)")
    ca_file = ca_file or pip_setting("cert")
    if ca_file:
        notes.append(f"extra CA for pip from {ca_file} (build secret, not kept in the image)")
    wheels = wheels or pip_setting("find-links")
    if wheels and not Path(wheels).is_dir():
        wheels = None
    if wheels:
        notes.append(f"local wheels from {wheels} (pip find-links, not kept in the image)")
    commit, dirty = io.git_state(".", untracked=True)
    lock = variant(variant_name).lock
    argv = build_command(engine, variant_name, version=__version__, commit=commit, dirty=dirty,
                         lock_sha256=io.sha256_file(lock), base_image=base,
                         ca_file=ca_file, wheels=wheels)
    return argv, notes


def prepare_run(runtime: str, args: list[str], *, gpus: bool = False, network: str | None = None,
                shell: bool = False, check: bool = True) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment holding the secrets) of `llmrepro ARGS` in the variant's image
    (cuda with `gpus`), the host's output root and HF cache mounted. `check=False` (dry run)
    skips looking for the engine, image or SIF and creating the mounted directories."""
    variant_name = "cuda" if gpus else "cpu"
    out = str(io.output_root().resolve())
    hf = host_hf_cache()
    names, env = secrets(runtime)
    if runtime == "apptainer":
        sif = archive_paths(__version__, variant_name)[1]
        if check:
            require_sif(sif, variant_name)
        argv = apptainer_command(sif, args, output_dir=out, hf_cache=hf, gpus=gpus, verb="shell" if shell else "run")
    elif runtime in ENGINES:
        image = image_tags(__version__, variant_name, None)[0]
        if check:
            require_image(detect_engine(runtime), image, variant_name)
        argv = run_command(runtime, image, args, output_dir=out, hf_cache=hf, uid=os.getuid(), gid=os.getgid(),
                           gpus=gpus, rootless=runtime == "podman" and os.getuid() != 0, network=network,
                           secret_names=names, interactive=shell, entrypoint="bash" if shell else None)
    else:
        raise UserError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if check:
        for d in (out, hf):
            Path(d).mkdir(parents=True, exist_ok=True)  # so that the engine does not create them as root
    return argv, env


def detect_engine(name: str | None = None) -> str:
    """`name` if usable, else the first working engine (docker with a reachable daemon, then podman)."""
    candidates = [name] if name else list(ENGINES)
    if name and name not in ENGINES:
        raise UserError(f"unknown engine '{name}': choose one of {', '.join(ENGINES)}")
    for engine in candidates:
        if not shutil.which(engine):
            continue
        if engine == "podman" or _succeeds([engine, "info"]):
            return engine
    if name:
        why = "is not installed" if not shutil.which(name) else "is installed but its daemon does not answer"
        raise UserError(f"{name} {why}; on Debian, `sudo bash scripts/setup-podman.sh` sets up podman")
    raise UserError("no container engine: install Docker (with its daemon running) or Podman "
                    "(on Debian: `sudo bash scripts/setup-podman.sh`)")


def require_image(engine: str, image: str, variant_name: str) -> None:
    if not _succeeds([engine, "image", "inspect", image]):
        raise UserError(f"image {image} not found in {engine}: build it with "
                        f"`invoke build --variant {variant_name} --engine {engine}`")


def require_sif(sif: str, variant_name: str) -> None:
    if not shutil.which("apptainer"):
        raise UserError("apptainer is not installed (see https://apptainer.org/docs/admin/main/installation.html)")
    if not Path(sif).is_file():
        raise UserError(f"{sif} not found: make it with `invoke build --variant {variant_name}`, "
                        f"`invoke save --variant {variant_name}` and `invoke sif --variant {variant_name}`")


def image_id(engine: str, image: str) -> str:
    """The local image's content digest (`sha256:...`), recorded in the SIF's labels."""
    out = subprocess.run([engine, "image", "inspect", "--format", "{{.Id}}", image],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out if out.startswith("sha256:") else f"sha256:{out}"


def pip_setting(name: str) -> str | None:
    """The host pip's `cert` or `find-links` (env or pip config), so that builds see what pip sees."""
    if value := os.environ.get(f"PIP_{name.upper().replace('-', '_')}"):
        return value
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.split(".")[-1] == name:
            return value.strip("'\"")
    return None


def secrets(runtime: str, dotenv: str = ".env") -> tuple[tuple[str, ...], dict[str, str]]:
    """(names to pass, extra environment for the engine process) for HF_TOKEN and WANDB_API_KEY,
    from the environment or else `.env`; apptainer receives them as APPTAINERENV_<NAME>."""
    values = {k: v for k, v in _read_dotenv(dotenv).items() if k in SECRETS}
    values.update({k: os.environ[k] for k in SECRETS if os.environ.get(k)})
    if runtime == "apptainer":
        return tuple(values), {f"APPTAINERENV_{k}": v for k, v in values.items()}
    return tuple(values), values


def _read_dotenv(path: str) -> dict[str, str]:
    if not Path(path).is_file():
        return {}
    pairs = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            pairs[key.strip()] = value.strip().strip("'\"")
    return pairs


def _succeeds(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
