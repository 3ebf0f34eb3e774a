"""Inference-time intervention: shift chosen heads' slices of the attention output projection's input.

For each chosen (layer, head) with unit direction u and sigma (std of the training activations projected on u),
a forward pre-hook on that layer's o_proj adds alpha * sigma * u to the head's slice [h*d, (h+1)*d) at every token
position (the thesis' `InterventionHook`, ITI cell 28 @ a0bb04c: all positions, few-shot prefix included). The
heads of one layer share one hook holding one zero-padded shift vector, so a layer costs one add.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmrepro.representations import hooks

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Intervention:
    heads: list[tuple[int, int]]  # (layer, head), best first
    directions: np.ndarray  # (K, head_dim) unit vectors towards "true"
    sigmas: np.ndarray  # (K,)
    alpha: float

    def top(self, k: int, alpha: float | None = None) -> Intervention:
        return Intervention(self.heads[:k], self.directions[:k], self.sigmas[:k],
                            self.alpha if alpha is None else alpha)

    def shifts(self, n_heads: int, head_dim: int) -> dict[int, np.ndarray]:
        """layer -> the (H*d,) vector added to that layer's o_proj input."""
        import numpy as np

        out: dict[int, np.ndarray] = {}
        for (layer, head), u, s in zip(self.heads, self.directions, self.sigmas, strict=True):
            vec = out.setdefault(layer, np.zeros(n_heads * head_dim, dtype=np.float64))
            vec[head * head_dim: (head + 1) * head_dim] += self.alpha * s * u
        return out

    def save(self, path: Path) -> None:
        import numpy as np

        np.savez(path, heads=np.asarray(self.heads, dtype=np.int64).reshape(-1, 2), directions=self.directions,
                 sigmas=self.sigmas, alpha=np.float64(self.alpha))

    @classmethod
    def load(cls, path: Path) -> Intervention:
        import numpy as np

        z = np.load(path)
        return cls([tuple(int(v) for v in h) for h in z["heads"]], z["directions"], z["sigmas"], float(z["alpha"]))


@contextlib.contextmanager
def intervene(model, intervention: Intervention | None):
    """Apply `intervention` (None or K=0: nothing) while the block runs."""
    if intervention is None or not intervention.heads or intervention.alpha == 0:
        yield
        return
    import torch

    n_heads, head_dim = hooks.head_shape(model)
    projs = hooks.out_projections(model)
    handles = []

    def make(shift):
        def hook(module, args):
            x = args[0]  # as the source: the float64 shift added in float64, written back in the activation dtype
            return ((x.double() + shift.to(x.device)).to(x.dtype),) + tuple(args[1:])
        return hook

    try:
        for layer, vec in intervention.shifts(n_heads, head_dim).items():
            handles.append(projs[layer].register_forward_pre_hook(make(torch.from_numpy(vec))))
        yield
    finally:
        for h in handles:
            h.remove()
