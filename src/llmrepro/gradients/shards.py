"""Gradient shards on disk: atomic writes, completion markers, resume, ranges for cluster arrays, merge.

Layout, as in the source, under a root (the run directory's `gradients/`):

    {root}/{type}_{dim}|full/{model}/{dataset}/{split}/{checkpoint}/
        {start}_{end}         a torch.save'd (end - start, 1, D) tensor, the source's shape (it stacked one
                              (1, D) projection per sample): samples start..end-1, in dataset order
        {start}_{end}.done    its completion marker (JSON: rows, shape, dtype, bytes, sha256)
        sums/{start}_{end}    store_mean mode: the (1, D) float32 sum of those samples (+ .done)
        mean                  store_mean mode: the (1, D) mean over the whole dataset (+ mean.done)
        extraction.json       what produced the shards (projector, matrix, paradigm ...), checked on resume

A shard is written to a hidden temporary file and renamed into place, then its marker is written: a shard
without a marker is unfinished and is recomputed. The last shard holds the remainder (the source dropped it).
Shard k covers samples [k * per_file, min((k + 1) * per_file, n)). `read_rows` and `load_all` return (n, D)
rows (a stored (n, D) tensor, as runs before the (n, 1, D) layout wrote, reads the same).

`read_source(path)` reads gradients the source's extract_gradients.py wrote: one `{start}_{end}` file, or a
checkpoint directory of them (no markers: every file whose name has that form counts, and together they must
cover 0..N without gaps).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from llmrepro.core import io
from llmrepro.core.errors import UserError

if TYPE_CHECKING:
    import torch


def gradient_dir(root: Path, folder: str, model: str, dataset: str, split: str, checkpoint: str) -> Path:
    """`{root}/{folder}/{model}/{dataset}/{split}/{checkpoint}`, with names cut to their last path component."""
    def last(name: str) -> str:
        return name.rstrip("/").split("/")[-1].removeprefix("fixture:")

    return root / folder / last(model) / last(dataset) / split / last(checkpoint)


def ranges(n: int, per_file: int) -> list[tuple[int, int]]:
    """Every shard's sample range; the last one may be shorter."""
    return [(s, min(s + per_file, n)) for s in range(0, n, per_file)]


def name(start: int, end: int) -> str:
    return f"{start}_{end}"


def is_saved(path: Path) -> bool:
    """Whether `path` was written completely: its marker exists and records the file's size."""
    marker = path.with_name(f"{path.name}.done")
    return marker.is_file() and path.is_file() and json.loads(marker.read_text())["bytes"] == path.stat().st_size


def is_done(directory: Path, start: int, end: int) -> bool:
    return is_saved(directory / name(start, end))


def save(path: Path, tensor: torch.Tensor) -> None:
    """torch.save `tensor` to `path` atomically, then write its marker `path.done`."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object, so the archive's inner name does not depend on the path
        torch.save(tensor.contiguous().cpu(), f)
    os.replace(tmp, path)
    io.write_json(path.with_name(f"{path.name}.done"), {
        "rows": tensor.shape[0], "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
        "bytes": path.stat().st_size, "sha256": io.sha256_file(path)})


def write(directory: Path, start: int, end: int, tensor: torch.Tensor) -> None:
    save(directory / name(start, end), tensor)


def read(directory: Path, start: int, end: int) -> torch.Tensor:
    """A shard as stored: (n, 1, D) gradients, or (1, D) for store_mean's sums and mean."""
    import torch

    return torch.load(directory / name(start, end), weights_only=True)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, 1, D) as stored (or (n, D)) -> (n, D)."""
    return t.squeeze(1) if t.dim() == 3 and t.shape[1] == 1 else t


def read_rows(directory: Path, start: int, end: int) -> torch.Tensor:
    return as_rows(read(directory, start, end))


def missing(directory: Path, wanted: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [r for r in wanted if not is_done(directory, *r)]


def load_all(directory: Path, n: int, per_file: int) -> torch.Tensor:
    """All n samples' rows in order; refuses an incomplete set of shards."""
    import torch

    if gaps := missing(directory, ranges(n, per_file)):
        raise UserError(f"{directory}: {len(gaps)} of {math.ceil(n / per_file)} shards missing or unfinished "
                        f"(first: {name(*gaps[0])}); finish the extraction (--resume) or merge its shards")
    parts = [read_rows(directory, *r) for r in ranges(n, per_file)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one shard: no copy (a full one is 33 GB)


def read_source(path: Path) -> torch.Tensor:
    """(N, D) gradients from the source's files: one `{start}_{end}` file, or a directory of them."""
    import torch

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        found = sorted((tuple(map(int, f.name.split("_"))), f) for f in path.iterdir()
                       if f.is_file() and re.fullmatch(r"\d+_\d+", f.name))
        if not found:
            raise UserError(f"{path}: no gradient files named {{start}}_{{end}} (as extract_gradients.py writes)")
        expected = 0
        for (start, end), f in found:
            if start != expected:
                raise UserError(f"{path}: the files do not cover samples {expected}..{start - 1} "
                                f"(next file: {f.name}); extract that range first")
            expected = end
        files = [f for _, f in found]
    else:
        raise UserError(f"source gradients not found: {path}")
    parts = []
    for f in files:
        try:
            t = as_rows(torch.load(f, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise UserError(f"{f}: cannot read as torch.save'd gradients: {str(err).splitlines()[0][:160]}") from None
        start, end = map(int, f.name.split("_")) if re.fullmatch(r"\d+_\d+", f.name) else (0, len(t))
        if t.dim() != 2 or len(t) != end - start:
            raise UserError(f"{f}: holds a {tuple(t.shape)} tensor, not the ({end - start}, 1, D) its name says")
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_meta(directory: Path, meta: dict) -> None:
    """Write `extraction.json`, or check that shards already there were made the same way."""
    path = directory / "extraction.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise UserError(f"{directory}: existing shards were made with different settings ({', '.join(diff)}); "
                            "use a new run (--force) instead of resuming")
        return
    directory.mkdir(parents=True, exist_ok=True)
    io.write_json(path, meta)


def copy_shard(source: Path, dest: Path, start: int, end: int) -> None:
    """Hard-link (or copy) a finished shard and its marker from `source` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in (name(start, end), f"{name(start, end)}.done"):
        target = dest / file
        target.unlink(missing_ok=True)
        try:
            os.link(source / file, target)
        except OSError:
            shutil.copy2(source / file, target)


def merge(sources: list[Path], dest: Path, wanted: list[tuple[int, int]]) -> int:
    """Collect every wanted shard from the first source that finished it; returns how many were copied."""
    gaps = []
    for r in wanted:
        found = next((s for s in sources if is_done(s, *r)), None)
        if found is None:
            gaps.append(r)
        elif found != dest:
            copy_shard(found, dest, *r)
    if gaps:
        shown = ", ".join(name(*g) for g in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        raise UserError(f"merge: {len(gaps)} of {len(wanted)} shards are not finished in any of {len(sources)} "
                        f"run(s): {shown}; run those shard ranges first")
    return len(wanted)
