"""Container benchmark: CPU image build time, cold and after a source-only change; image size per
variant; start overhead of a smoke run in the container against the same run in the local venv.

    python benchmarks/containers.py [--engine podman] [--repeats 2] [--skip-cold]

Goals (issue #3): rebuild under 15 s, start overhead under 5 s. Both runs of a pair start from an
empty tiny-model cache, as a container does. Ends with the line
RESULT cold_build_s=<n> rebuild_s=<n> start_overhead_s=<n> cpu_image_mb=<n>
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from llmrepro import __version__
from llmrepro.launch import containers as ct

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "instruct/dolly-pythia-2.8b"


def timed(argv: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def build_argv(engine: str, tag: str, *extra: str) -> list[str]:
    """The `invoke build --variant cpu` command of the current directory, tagged `tag` instead."""
    argv, _ = ct.prepare_build(engine, "cpu")
    argv = [tag if a.startswith(f"{ct.REPO}:") else a for a in argv]
    return [*argv[:2], *extra, *argv[2:]]


def copy_tree(dst: Path) -> None:
    """The work tree as git sees it (tracked and untracked, not ignored files)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


def smoke_pair(engine: str, image: str, work: Path) -> tuple[float, float]:
    """(local venv seconds, container seconds) of one smoke run each, fresh outputs and caches."""
    args = ["run", EXPERIMENT, "--profile", "smoke"]
    local_env = {**os.environ, "LLMREPRO_OUTPUT_DIR": str(work / "local"), "LLMREPRO_CACHE": str(work / "cache"),
                 "HF_HUB_OFFLINE": "1", "LLMREPRO_PROGRESS": "0"}
    local = timed(["llmrepro", *args], env=local_env)
    (work / "box").mkdir()
    argv = ct.run_command(engine, image, args, output_dir=str(work / "box"), hf_cache=str(work / "hf"),
                          uid=os.getuid(), gid=os.getgid(), rootless=engine == "podman" and os.getuid() != 0,
                          network="none")
    (work / "hf").mkdir()
    return local, timed(argv)


def image_mb(engine: str, image: str) -> float | None:
    out = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True)
    return round(int(out.stdout.strip()) / 1e6, 1) if out.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=None, help="docker | podman (default: auto-detected)")
    parser.add_argument("--repeats", type=int, default=2, help="smoke run pairs; the fastest of each side counts")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold (--no-cache) build")
    args = parser.parse_args()
    os.chdir(ROOT)
    engine = ct.detect_engine(args.engine)
    image = ct.image_tags(__version__, "cpu", None)[0]

    cold = None
    if not args.skip_cold:
        cold = timed(build_argv(engine, "llmrepro-bench:cold", "--no-cache"))
        subprocess.run([engine, "rmi", "llmrepro-bench:cold"], capture_output=True)
        print(f"cold build: {cold:.1f} s")
    subprocess.run(build_argv(engine, image), check=True, stdout=subprocess.DEVNULL)  # the cache to rebuild from
    with tempfile.TemporaryDirectory() as tmp:
        copy_tree(Path(tmp))
        with open(Path(tmp) / "src/llmrepro/containers.py", "a") as f:
            f.write("# a source-only change\n")
        rebuild = timed(build_argv(engine, "llmrepro-bench:rebuild"), cwd=tmp)
    subprocess.run([engine, "rmi", "llmrepro-bench:rebuild"], capture_output=True)
    print(f"rebuild after a source-only change: {rebuild:.1f} s (goal < 15 s)")

    pairs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            pairs.append(smoke_pair(engine, image, Path(tmp)))
    local, boxed = min(p[0] for p in pairs), min(p[1] for p in pairs)
    overhead = boxed - local
    print(f"smoke run {EXPERIMENT}: local {local:.1f} s, {engine} {boxed:.1f} s, overhead {overhead:.1f} s (goal < 5 s)")

    sizes = {name: image_mb(engine, ct.image_tags(__version__, name, None)[0]) for name in ct.VARIANTS}
    for name, mb in sizes.items():
        print(f"image {name}: {f'{mb} MB' if mb is not None else 'not built here'}")
    cold_s = f"{cold:.1f}" if cold is not None else "nan"
    print(f"RESULT cold_build_s={cold_s} rebuild_s={rebuild:.1f} start_overhead_s={overhead:.1f} "
          f"cpu_image_mb={sizes['cpu']}")


if __name__ == "__main__":
    main()
