"""Activation caching: the per-head input of every layer's attention output projection and the residual stream
after every decoder layer, at each statement's last token, streamed to disk.

The thesis (Detection cells 9-12, ITI cell 27 @ a0bb04c) ran one statement at a time (`tokenizer.encode`, default
special tokens, no padding), a forward pre-hook on `o_proj` storing `input[0][..., -1, :]` as float16, then
reshaped to [N, layers, heads, head_dim]. Here statements run in right-padded batches (real tokens never attend to
the padding after them and keep their positions, so each row equals its batch-1 run up to kernel rounding) and the
hook gathers each row's last real token. Rows go straight into their `.npy` files, so memory stays flat in N.

Files per dataset directory: heads.npy float16 [N, L, H, d]; resid.npy float16 [N, L, D] (decoder layer l's
output, i.e. the residual stream entering block l+1: geometry-of-truth's `model.model.layers[l].output[0]`);
labels.npy int8; groups.npy int64; progress.json (rows done: a resumed run continues there).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmrepro.core import io
from llmrepro.lm import layers
from llmrepro.representations import hooks

if TYPE_CHECKING:
    pass


class LastTokenCapture:
    """Hooks that record, per forward pass, each row's last-real-token o_proj input (split per head) and residual."""

    def __init__(self, model, heads: bool = True, resid: bool = True):
        self.model, self.want_heads, self.want_resid = model, heads, resid
        self.n_heads, self.head_dim = hooks.head_shape(model)
        self.last = None  # (B,) tensor: index of each row's last real token
        self.heads: list = []
        self.resid: list = []
        self._handles = []

    def __enter__(self):
        if self.want_heads:
            for i, proj in enumerate(hooks.out_projections(self.model)):
                self._handles.append(proj.register_forward_pre_hook(self._pre_hook(i)))
        if self.want_resid:
            for i, layer in enumerate(layers.decoder_layers(self.model)):
                self._handles.append(layer.register_forward_hook(self._post_hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _rows(self, x):
        import torch

        return x[torch.arange(x.shape[0], device=x.device), self.last.to(x.device)]  # (B, width)

    def _pre_hook(self, i):
        def hook(module, args, kwargs=None):
            self.heads[i] = self._rows(args[0]).detach().float().cpu()
        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            self.resid[i] = self._rows(layers.layer_output(output)).detach().float().cpu()
        return hook

    def run(self, input_ids, attention_mask):
        """One batch: (heads (B, L, H, d) or None, resid (B, L, D) or None) as float32 numpy."""
        import torch

        n_layers = len(layers.decoder_layers(self.model))
        self.heads, self.resid = [None] * n_layers, [None] * n_layers
        self.last = attention_mask.sum(-1) - 1
        # the backbone without its LM head: the hooks see the same modules, and the (B, T, vocab) logits, never
        # read, were a third of SmolLM2-135M's CPU time (vocabulary 49,152 x 576; benchmarks/activation_cache.py)
        backbone = getattr(self.model, "base_model", self.model)
        with torch.inference_mode():
            backbone(input_ids=input_ids, attention_mask=attention_mask)
        heads = resid = None
        if self.want_heads:
            heads = torch.stack(self.heads, 1)  # (B, L, H*d)
            heads = heads.reshape(heads.shape[0], n_layers, self.n_heads, self.head_dim).numpy()
        if self.want_resid:
            resid = torch.stack(self.resid, 1).numpy()  # (B, L, D)
        return heads, resid


class NpyWriter:
    """Rows of a float16 .npy file written at their offsets with pwrite: nothing stays mapped or buffered, so the
    process' memory does not grow with the file (a memory map's dirty pages would count as resident)."""

    def __init__(self, path: Path, shape: tuple, resume: bool = False):
        import numpy as np

        if not (resume and path.is_file()):
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)  # header + sparse data
        self.row_bytes = int(np.prod(shape[1:])) * 2
        self.offset = path.stat().st_size - shape[0] * self.row_bytes
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows) -> None:
        import numpy as np

        os.pwrite(self.fd, np.ascontiguousarray(rows, dtype=np.float16).tobytes(), self.offset + start * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


def encode(tok, statements: list[str]) -> list[list[int]]:
    """`tokenizer.encode(statement)` as the thesis did: the tokenizer's default special tokens (BOS for Llama)."""
    return [tok(s)["input_ids"] for s in statements]


def _batch(ids: list[list[int]], pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        out[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return out, mask


def cache(model, tok, statements: list[str], labels, groups, out_dir: Path, batch_size: int = 16,
          heads: bool = True, resid: bool = True, progress=None, resume: bool = False) -> dict:
    """Write the activations of `statements` under `out_dir` (see the module docstring); returns their shapes."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    n_layers, (n_heads, head_dim) = len(layers.decoder_layers(model)), hooks.head_shape(model)
    hidden = getattr(getattr(model.config, "text_config", None) or model.config, "hidden_size", None) or \
        model.config.n_embd
    n = len(statements)
    shapes = {"heads": (n, n_layers, n_heads, head_dim), "resid": (n, n_layers, hidden)}
    wanted = {"heads": heads, "resid": resid}
    state_path = out_dir / "progress.json"
    done = io.read_json(state_path)["rows"] if resume and state_path.is_file() else 0
    writers = {k: NpyWriter(out_dir / f"{k}.npy", shape, resume=done > 0) for k, shape in shapes.items() if wanted[k]}
    np.save(out_dir / "labels.npy", np.asarray(labels, dtype=np.int8))
    np.save(out_dir / "groups.npy", np.asarray(groups, dtype=np.int64))
    ids = encode(tok, statements)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    starts = range(done, n, batch_size)
    bar = progress(starts, desc=out_dir.name, unit="batch") if progress else starts
    with LastTokenCapture(model, heads=heads, resid=resid) as cap:
        for s in bar:
            x, mask = _batch(ids[s: s + batch_size], pad)
            h, r = cap.run(x.to(device), mask.to(device))
            if h is not None:
                writers["heads"].write(s, h)
            if r is not None:
                writers["resid"].write(s, r)
            if (s // batch_size) % 16 == 15 or s + batch_size >= n:  # the resume point, now and then
                for w in writers.values():
                    w.sync()
                io.write_json(state_path, {"rows": min(s + batch_size, n)})
    for w in writers.values():
        w.close()
    io.write_json(state_path, {"rows": n})
    return {k: list(v) for k, v in shapes.items() if wanted[k]}


def load(run_dir: Path, dataset: str, kind: str = "heads", mmap: bool = True):
    """(activations, labels, groups) of one dataset of a cache-activations run."""
    import numpy as np

    d = Path(run_dir) / "activations" / dataset
    acts = np.load(d / f"{kind}.npy", mmap_mode="r" if mmap else None)
    return acts, np.load(d / "labels.npy").astype(np.int64), np.load(d / "groups.npy")


@contextlib.contextmanager
def nothing():
    yield
