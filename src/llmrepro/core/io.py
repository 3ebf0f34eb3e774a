"""Small file and text helpers every layer shares: atomic writes, standard JSON, hashing, git state, tables.

Writers go through a hidden temporary file and a rename, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
from pathlib import Path

DEFAULT_OUTPUT_ROOT = "outputs"


def output_root(output_dir: str | Path | None = None) -> Path:
    """Where runs go: `output_dir`, else $LLMREPRO_OUTPUT_DIR, else ./outputs."""
    return Path(output_dir or os.environ.get("LLMREPRO_OUTPUT_DIR") or DEFAULT_OUTPUT_ROOT)


def finite(value):
    """NaN and infinities as null: standard JSON has no such numbers and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    """Standard JSON (non-finite numbers as null), written atomically."""
    write_text(path, json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_user_json(path: Path, what: str):
    """A JSON file the user named: its data, or one line `<path>: <what> (<why>)` (exit code 2)."""
    from llmrepro.core.errors import UserError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: {what} ({err})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_once(path: Path, build, done: str = "config.json") -> Path:
    """`path`, made the first time by `build(tmp)` in a temporary sibling directory that is then renamed into
    place: a reader never sees half a directory, and of two processes racing the second keeps the first's."""
    import shutil
    import tempfile

    if (path / done).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process built it first (rename onto a non-empty directory fails)
            if not (path / done).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def git(repo: str | Path, *args: str) -> str | None:
    """`git -C repo ARGS` stdout, or None when git or the repository is missing."""
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(repo: str | Path = ".", untracked: bool = False) -> tuple[str | None, bool | None]:
    """(HEAD commit or None, whether the work tree differs from it: tracked files, and with `untracked` also
    files git does not ignore; None without a repository)."""
    commit = git(repo, "rev-parse", "--verify", "-q", "HEAD")
    if commit is None:
        return None, None
    return commit, bool(git(repo, "status", "--porcelain", f"--untracked-files={'normal' if untracked else 'no'}"))


def csv_text(header: list[str], rows) -> str:
    """CSV (`\\n` line ends) of `header` and `rows`, values written as Python writes them (None as empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def table(rows: list[list], header: list[str], fmt: str = "text") -> str:
    """Rows as an aligned text table, a markdown table, CSV or JSON (a list of objects)."""
    cells = [[_cell(x) for x in row] for row in rows]
    if fmt == "json":
        return json.dumps(finite([dict(zip(header, row, strict=True)) for row in rows]), indent=2, default=str)
    if fmt == "csv":
        return csv_text(header, cells).rstrip("\n")
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def cache_dir() -> Path:
    """llmrepro's cache (tiny models, fixtures, converted models): $LLMREPRO_CACHE, else ~/.cache/llmrepro."""
    if env := os.environ.get("LLMREPRO_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmrepro"
