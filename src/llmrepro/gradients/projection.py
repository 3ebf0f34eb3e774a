"""Random projection of per-sample gradients through traker's projectors (JL transform).

Implementations (`projector:` in a config), never substituted for one another:
- `basic`: traker's `BasicProjector`, on any device. Its matrix is generated block by block (block i from
  seed + 1000 i) by that device's RNG, so the device (CPU and CUDA generators differ for the same seed) and
  the block size are part of what defines the matrix: it is the largest that keeps one
  block (grad_dim x block_size floats) under `max_matrix_mb`, recorded with the results. A matrix of one
  block is generated once and kept; larger ones are regenerated per call, so one call projects a whole batch.
- `cuda`: traker's `CudaProjector` (the `fast_jl` kernel), as the source used it: seed 42, model_id 0,
  `max_batch_size` 8, so its projections match the source's. Needs a CUDA GPU, `fast_jl`, and a projection
  dimension that is a multiple of 512.
- `factored`: not a projector of flat gradients: parameter and LoRA gradients projected tensor by tensor from
  their captured factors (`llmrepro.gradients.factored`, LoGra-style), `dim` split over the tensors by `dims`.

`Projection` is the config section; `Projector(spec, grad_dim, device)` builds the projector after checking
it can run, and `.project(grads)` maps (B, grad_dim) -> (B, dim) float32 (both projectors compute in and
return float32; fast_jl multiplies half-precision inputs with float32 accumulation), moving bounded batches
of rows to the device. The CUDA kernel regenerates its random factors inside every call, from the seed and
the GPU's number of multiprocessors (its feature tiles): `describe()` records that count, since another GPU
model gives another matrix.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from llmrepro.core.config import Strict
from llmrepro.core.errors import UserError

if TYPE_CHECKING:
    import torch

CUDA_DIM_MULTIPLE = 512


class ProjectorKind(str, Enum):
    basic = "basic"
    cuda = "cuda"
    factored = "factored"


class ProjectionType(str, Enum):
    """traker's `ProjectionType` values (the config loads without importing traker, and so torch)."""

    normal = "normal"
    rademacher = "rademacher"


class Projection(Strict):
    dim: int = Field(16384, ge=1)  # source default 2**14
    type: ProjectionType = ProjectionType.rademacher
    projector: ProjectorKind = ProjectorKind.basic
    seed: int = 42  # the source's
    max_matrix_mb: int = Field(1024, ge=1)  # basic: memory for one block of the random matrix
    max_batch_size: Literal[8, 16, 32] = 8  # cuda: rows per kernel call (the source's 8)
    dims: Literal["exact", "source"] = "exact"  # factored: split of dim over tensors (dot_products.split_dims)

    @model_validator(mode="after")
    def _cuda_dim(self):
        if self.projector == ProjectorKind.cuda and self.dim % CUDA_DIM_MULTIPLE:
            raise ValueError(f"dim {self.dim} is not a multiple of {CUDA_DIM_MULTIPLE}, which the cuda "
                             f"projector (fast_jl) requires; use a multiple of {CUDA_DIM_MULTIPLE} or projector: basic")
        return self

    @property
    def folder(self) -> str:
        """The source's directory name for projected gradients: `{type}_{dim}` (`factored_{type}_{dim}`)."""
        prefix = "factored_" if self.projector == ProjectorKind.factored else ""
        return f"{prefix}{self.type.value}_{self.dim}"


def block_size(spec: Projection, grad_dim: int) -> int:
    """Columns of the basic projector's matrix generated at once: as many as fit in `max_matrix_mb`."""
    return max(1, min(spec.dim, spec.max_matrix_mb * 2**20 // (4 * grad_dim)))


class Projector:
    """A traker projector with the source's model_id (0), fed a bounded number of rows per call."""

    def __init__(self, spec: Projection, grad_dim: int, device: str | torch.device = "cpu"):
        import torch
        from trak.projectors import BasicProjector, CudaProjector
        from trak.projectors import ProjectionType as TrakType

        if spec.projector == ProjectorKind.factored:
            raise ValueError("the factored projection works on captured factors: use factored.FactoredProjector")
        self.spec, self.grad_dim, self.device = spec, grad_dim, torch.device(device)
        kind = TrakType(spec.type.value)
        if spec.projector == ProjectorKind.cuda:
            _check_cuda(self.device)
            self.impl = CudaProjector(grad_dim=grad_dim, proj_dim=spec.dim, seed=spec.seed, proj_type=kind,
                                      device=self.device, max_batch_size=spec.max_batch_size)
            self.rows = spec.max_batch_size
        else:
            self.block_size = block_size(spec, grad_dim)
            self.impl = BasicProjector(grad_dim=grad_dim, proj_dim=spec.dim, seed=spec.seed, proj_type=kind,
                                       device=self.device, block_size=self.block_size)
            self.rows = None  # one call per batch: the matrix is regenerated per call when it has several blocks

    def describe(self) -> dict:
        """What defines the matrix, for the record next to the projected gradients."""
        out = {"projector": self.spec.projector.value, "type": self.spec.type.value, "dim": self.spec.dim,
               "seed": self.spec.seed, "model_id": 0, "grad_dim": self.grad_dim,
               "device": self.device.type}  # the matrix comes from this device's RNG: cpu and cuda differ
        if self.spec.projector == ProjectorKind.basic:
            out["block_size"] = self.block_size
        else:
            import torch

            props = torch.cuda.get_device_properties(self.device)
            out.update(gpu=props.name, multiprocessors=props.multi_processor_count)  # fast_jl's feature tiles
        return out

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, grad_dim) -> (B, dim) float32, on the projector's device."""
        if grads.shape[-1] != self.grad_dim:
            raise ValueError(f"gradient dimension {grads.shape[-1]} != projector's {self.grad_dim}")
        import torch

        step = self.rows or len(grads)  # cuda: fast_jl computes each row on its own; basic: one call
        return torch.cat([self.impl.project(grads[i:i + step].to(self.device).contiguous(), model_id=0)
                          for i in range(0, len(grads), step)])


def _check_cuda(device: torch.device) -> None:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError("projection.projector=cuda needs a CUDA GPU; none is available (use projector: basic)")
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        raise UserError("projection.projector=cuda needs the fast_jl package (pip install fast_jl, built "
                        "against this CUDA); use projector: basic otherwise") from None
