"""The memory planner: the fake step against the allocator's accounting of the same real step, depth
extrapolation against a full-depth fake step, the shipped architectures against published parameter counts, ZeRO
accounting by hand, the CLI's breakdown and verdicts, the OOM reproduction it predicts, and the whole catalog."""

from __future__ import annotations

import json

import pytest
import torch

from llmrepro.core import catalog
from llmrepro.training import memory
from llmrepro.training.planning import api, estimate, measure
from llmrepro.training.planning.workloads import model_of, workload

WIDE = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512}  # tiny-pythia, a little larger
LORA = (8, 16, 0.05, ("query_key_value",))


def _tiny(overrides=WIDE) -> str:
    config, _ = api.model_config({"name": "tiny-pythia", "tiny_config": overrides})
    return api._config_json(config)


def _real_step(cfg_json: str, step: measure.Step) -> None:
    """The step measure() fakes, for real: random weights, a padded batch, two optimizer steps."""
    cfg = measure._config(step)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = measure._build(cfg, step)
    optimizer = measure._optimizer(model, step)
    batch = measure._inputs(cfg, step)
    batch["attention_mask"][-1, -1] = 0  # a padded batch: the attention mask is materialized, as in the fake step
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [None, LORA])
def test_fake_step_predicts_the_allocators_peak(checkpointing, lora):
    """Predicted (FakeTensorMode + MemTracker) vs measured (the CPU allocator's own accounting) peak bytes."""
    step = measure.Step(config=_tiny(), batch=4, seq=128, checkpointing=checkpointing, lora=lora)
    predicted = measure.measure(step).peak()["total"]
    measured, _ = memory.peak_allocated(_real_step, step.config, step)
    assert predicted == pytest.approx(measured, rel=0.005)


def test_depth_extrapolation_is_exact(monkeypatch):
    """A 7-block model measured from its 2- and 3-block versions equals the 7-block fake step, phase by phase."""
    for lora, checkpointing in [(None, False), (LORA, True)]:
        step = measure.Step(config=_tiny({**WIDE, "num_hidden_layers": 7}), batch=2, seq=64, lora=lora,
                            checkpointing=checkpointing)
        extrapolated = measure._measure(step)
        monkeypatch.setattr(measure, "MIN_DEPTH", 100)
        direct = measure._measure(step)
        monkeypatch.undo()
        assert extrapolated.extrapolated and not direct.extrapolated
        assert extrapolated.phases == {p: v for p, v in direct.phases.items() if p != "backward:middle"}
        assert (extrapolated.params, extrapolated.trainable) == (direct.params, direct.trainable)


def test_shipped_architectures_have_the_published_parameter_counts():
    """Pythia's model card ("Total params") and Llama-2-7B's 6,738,415,616, from the configs planned offline."""
    published = {"EleutherAI/pythia-1.4b": 1_414_647_808, "EleutherAI/pythia-2.8b": 2_775_208_960,
                 "EleutherAI/pythia-6.9b": 6_857_302_016, "EleutherAI/pythia-12b": 11_846_072_320,
                 "meta-llama/Llama-2-7b-hf": 6_738_415_616}
    for name, count in published.items():
        config, source = api.model_config({"name": name})
        assert source == "shipped architecture table"
        assert measure.counts_on_meta(measure.Step(config=api._config_json(config)))["params"] == count


def test_zero3_accounting_by_hand():
    """Pythia-12B, ZeRO-3 on 8 ranks (dolly's a100 config): model states per rank, computed by hand."""
    exp = catalog.load("instruct/dolly-pythia-12b")
    plan = api.plan_params(exp.name, "instruct-sft", exp.resolve(None).model_dump(mode="json"), None,
                           exp.spec.resources, gpus=8, search=False)
    b, mem = plan.estimate.breakdown, plan.estimate.memory
    p, h = 11_846_072_320, 5120
    assert mem.params == mem.trainable == p
    assert b.optimizer == 12 * p // 8  # fp32 master weights + Adam's two moments, partitioned
    assert b.gradients == 2 * p // 8 + 2 * 2 * h * h  # bf16 partition + two reduce buckets of h^2
    block = 12 * h * h + 13 * h  # QKV, dense, MLP weights and biases, two LayerNorms of a GPT-NeoX block
    assert mem.largest_block == block
    assert b.parameters == 2 * p // 8 + 2 * (block + int(0.9 * h * h))  # partition + gathered block + prefetch
    assert b.reserve == estimate.CUDA_RESERVE + int(estimate.FRAGMENTATION * b.tensors)


def test_plan_breakdown_and_verdicts(cli):
    code, out, _ = cli("plan", "instruct/dolly-pythia-12b")
    assert code == 0 and "verdict: fits:" in out and "8 x GPU of 80.0 GiB" in out
    for row in ("parameters", "gradients", "optimizer states", "activations", "temporary buffers",
                "framework reserve", "peak"):
        assert f"\n  {row} " in out
    assert "checkpointing on: " in out and "DeepSpeed zero3: ZeRO-3" in out
    code, out, _ = cli("plan", "instruct/dolly-pythia-12b", "--gpus", "1")
    assert code == 1 and "verdict: OOM: needs" in out and "smallest change that fits: " in out


def test_oom_experiment_is_predicted(cli):
    """The documented 12B configuration on 2 GPUs: ZeRO-3's 16 bytes per parameter alone exceed 80 GiB."""
    code, out, _ = cli("plan", "instruct/dolly-pythia-12b-oom")
    assert code == 1 and "2 x GPU of 80.0 GiB" in out and "verdict: OOM" in out
    assert "smallest change that fits: train.deepspeed=zero3_offload" in out and "also fits: --gpus 4" in out
    assert 16 * 11_846_072_320 / 2 > 80 * 2**30


def test_oom_smoke_ends_with_status_oom_and_a_snapshot(cli, tmp_path):
    exp = "instruct/dolly-pythia-12b-oom"
    code, out, _ = cli("plan", exp, "--profile", "smoke")
    assert code == 1 and "(the run's memory cap 32 MB)" in out and "verdict: OOM: needs" in out
    code, _, err = cli("run", exp, "--profile", "smoke", "--output-dir", str(tmp_path))
    assert code == 3
    assert err.strip().splitlines()[-1].startswith("llmrepro: error: out of memory: ")
    (run_dir,) = (tmp_path / exp).iterdir()
    assert run_dir.name.endswith(".partial")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "oom" and manifest["error"].startswith("OutOfMemoryError: CPU memory cap: ")
    snapshot = json.loads((run_dir / "memory_snapshot.json").read_text())
    assert snapshot["device"] == "cpu" and snapshot["cap_mb"] == 32 and snapshot["requested_bytes"] > 0
    assert "tried to allocate" in snapshot["message"] and snapshot["live_mb"]["parameters"] > 0
    assert snapshot["live_mb"]["total"] > 32 >= snapshot["live_mb"]["total"] - snapshot["requested_bytes"] / 2**20
    assert snapshot["largest_live_tensors_mb"][0]["mb"] > 1
    assert (run_dir / "run.log").is_file() and "out of memory" in (run_dir / "run.log").read_text()
    code, out, _ = cli("smoke", "--only", exp, "--output-dir", str(tmp_path))  # the expected outcome
    assert code == 0 and "oom (expected)" in out


@pytest.mark.parametrize(("args", "message"), [
    (["no/such-experiment"], "unknown experiment"),
    (["instruct/dolly-pythia-12b", "--gpus", "-1"], "--gpus -1: give 0 (CPU) or more"),
    (["instruct/dolly-pythia-12b", "--gpu-mem", "0"], "--gpu-mem 0.0: give the memory per GPU in GiB"),
    (["instruct/dolly-pythia-12b", "model.name=someone/unknown-model"],
     "plan: no config for model 'someone/unknown-model' offline"),
])
def test_bad_input_is_one_line(cli, args, message):
    code, out, err = cli("plan", *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.slow
def test_plan_covers_the_catalog(cli):
    """Every experiment: its model's config resolves offline and its workload reads (default profile), and
    `llmrepro plan --profile smoke` prints the breakdown and a verdict."""
    for name in catalog.names():
        exp = catalog.load(name)
        spec = exp.run_spec(None, [])
        model = model_of(spec.params)
        config = api.model_config(model)[0] if model else {}
        assert workload(spec.recipe, spec.params, api.max_length_of(config)).kind in ("train", "gradients", "forward",
                                                                                      "none"), name
        code, out, err = cli("plan", name, "--profile", "smoke")
        assert code in (0, 1) and "\nverdict: " in out, (name, err)
        assert "nothing of the run's own" in out or "\n  peak " in out, name
