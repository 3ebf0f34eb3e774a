"""What only a GPU can show: the CUDA projector (fast_jl) inside the extraction, and bitsandbytes 8-bit + LoRA.

Skipped without CUDA; run on a GPU machine with `pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(importlib.util.find_spec("fast_jl") is None, reason="needs fast_jl")
def test_cuda_extraction_equals_cuda_projector_of_full_gradients(cli, tmp_path):
    """The cuda projector run's shards are traker's CudaProjector (seed 42, model_id 0) applied to the full
    per-sample gradients, as in the source."""
    from trak.projectors import CudaProjector, ProjectionType

    from llmrepro.gradients import store

    common = ["--profile", "smoke", "--output-dir", str(tmp_path), "data.limit=10", "gradients_per_file=4"]
    assert cli("run", "gradients/olmo2-7b-sft-full-train", *common)[0] == 0
    code, _, err = cli("run", "gradients/olmo2-7b-sft-rademacher16384-train", *common, "projection.projector=cuda",
                       "projection.dim=1024", "projection.type=normal")  # same smoke model as the full run
    assert code == 0, err
    (full_dir,) = (tmp_path / "gradients" / "olmo2-7b-sft-full-train").iterdir()
    (proj_dir,) = (tmp_path / "gradients" / "olmo2-7b-sft-rademacher16384-train").iterdir()
    full, _, _ = store.load(full_dir)
    projected, _, meta = store.load(proj_dir)
    p = meta["projection"]
    assert p["projector"] == "cuda" and p["dim"] == 1024 and projected.shape == (10, 1024)
    ref = CudaProjector(p["grad_dim"], 1024, 42, ProjectionType.normal, "cuda", max_batch_size=8)
    expected = torch.cat([ref.project(full[i:i + 8].cuda().contiguous(), model_id=0) for i in range(0, 10, 8)])
    torch.testing.assert_close(projected.float().cpu(), expected.float().cpu(), atol=1e-3, rtol=1e-3)
    # a JL projection roughly preserves inner products: the ranking of samples by similarity survives
    sims_full, sims_proj = full @ full[0], projected.float().cpu() @ projected.float().cpu()[0]
    assert torch.argsort(sims_full)[-1] == torch.argsort(sims_proj)[-1] == 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_8bit_model_with_lora_trains_adapters_only():
    import bitsandbytes as bnb

    from llmrepro.lm.models import LoraSpec, ModelConfig, load_model, load_tokenizer

    cfg = ModelConfig(name="tiny-llama", quantization="8bit", lora=LoraSpec(r=4, alpha=8))
    model, tok = load_model(cfg), load_tokenizer(cfg)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = tok(["The city of Paris is in France."], return_tensors="pt").to("cuda")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
