"""Projection: traker's matrices exactly, bounded blocks, CUDA checks; extraction = projection of full gradients."""

from __future__ import annotations

import json

import pytest
import torch
from trak.projectors import BasicProjector, ProjectionType

from llmrepro.core.errors import UserError
from llmrepro.gradients import store
from llmrepro.gradients.projection import Projection, Projector, block_size


@pytest.mark.parametrize("ptype", ["normal", "rademacher"])
@pytest.mark.parametrize("max_matrix_mb", [1024, 1])  # one block kept, or regenerated in blocks
def test_projector_equals_traker(ptype, max_matrix_mb):
    grads = torch.randn(5, 3000)
    spec = Projection(dim=700, type=ptype, max_matrix_mb=max_matrix_mb)
    proj = Projector(spec, 3000)
    bs = block_size(spec, 3000)
    assert bs == (700 if max_matrix_mb == 1024 else 2**20 // (4 * 3000))
    ref = BasicProjector(3000, 700, 42, ProjectionType(ptype), "cpu", block_size=bs).project(grads, model_id=0)
    torch.testing.assert_close(proj.project(grads), ref, rtol=0, atol=0)
    assert proj.describe()["block_size"] == bs


def test_cuda_projector_needs_a_multiple_of_512():
    with pytest.raises(ValueError, match="dim 1000 is not a multiple of 512"):
        Projection(dim=1000, projector="cuda")
    Projection(dim=2_048_000, projector="cuda")  # 4000 x 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_projector_without_gpu_fails_clearly():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        Projector(Projection(dim=512, projector="cuda"), 1024, "cpu")


def test_bad_cuda_dim_fails_with_one_line(cli, tmp_path):
    code, _, err = cli("run", "gradients/olmo2-7b-sft-normal8192-train", "projection.dim=1000",
                       "--output-dir", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dim 1000 is not a multiple of 512, which the cuda projector (fast_jl) requires" in err
    assert not any(tmp_path.iterdir())  # rejected before any work


def test_projections_are_float32_whatever_the_input():
    """Both projectors compute in float32, as fast_jl returns float32 for the source's half-precision input."""
    grads = torch.randn(3, 2048).half()
    out = Projector(Projection(dim=512), 2048).project(grads)
    assert out.dtype == torch.float32
    ref = BasicProjector(2048, 512, 42, ProjectionType.rademacher, "cpu", block_size=512).project(grads.float(), 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_extracted_projection_equals_traker_projection_of_full_gradients(cli, tmp_path):
    """The projected run's shards are traker's BasicProjector applied to the full run's per-sample gradients
    (float16, as the source cast them before projecting), stored float32 in the source's (n, 1, dim) layout."""
    common = ["--profile", "smoke", "--output-dir", str(tmp_path), "data.limit=10", "gradients_per_file=4"]
    assert cli("run", "gradients/olmo2-7b-sft-full-train", *common)[0] == 0
    assert cli("run", "gradients/olmo2-7b-sft-rademacher16384-train", *common)[0] == 0
    full_dir, = (tmp_path / "gradients" / "olmo2-7b-sft-full-train").iterdir()
    proj_dir, = (tmp_path / "gradients" / "olmo2-7b-sft-rademacher16384-train").iterdir()
    full, _, _ = store.load(full_dir)
    projected, _, meta = store.load(proj_dir)
    assert (full_dir / "gradients/full/tiny-olmo2/sampled-tulu/train/main/8_10").is_file()
    shard = proj_dir / "gradients/rademacher_2048/tiny-olmo2/sampled-tulu/train/main/8_10"
    assert torch.load(shard).shape == (2, 1, 2048) and torch.load(shard).dtype == torch.float32
    p = meta["projection"]
    assert (full.shape, full.dtype, projected.shape, p["grad_dim"]) == ((10, 128 * 64), torch.float16, (10, 2048), 128 * 64)
    ref = BasicProjector(p["grad_dim"], p["dim"], 42, ProjectionType.rademacher, p["device"],  # the run's RNG
                         block_size=p["block_size"]).project(full.to(p["device"]), model_id=0)
    torch.testing.assert_close(projected, ref.cpu(), atol=1e-4, rtol=1e-4)
    assert json.loads((proj_dir / "metrics.json").read_text())["dim"] == 2048
