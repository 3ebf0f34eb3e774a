"""The fused optimizer step: same parameters as the standard optimizer, gradients freed inside backward,
schedulers and Trainer driving it through virtual param groups, and one-line errors for what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from llmrepro.training.fused_optimizer import FusedOptimizer, UnsupportedError, unsupported

OPTIMIZERS = {  # class, per-group extras (two groups with different lr and betas/momentum)
    "sgd": (torch.optim.SGD, [{"lr": 0.05, "momentum": 0.9}, {"lr": 0.01, "momentum": 0.5}]),
    "adam": (torch.optim.Adam, [{"lr": 1e-2, "betas": (0.8, 0.9)}, {"lr": 1e-3}]),
    "adamw": (torch.optim.AdamW, [{"lr": 1e-2, "betas": (0.8, 0.9)}, {"lr": 1e-3, "betas": (0.95, 0.99)}]),
}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.ReLU(), torch.nn.Linear(50, 50), torch.nn.ReLU(),
                               torch.nn.Linear(50, 1))


def _groups(net, extras):
    params = list(net.parameters())
    return [{"params": params[:2], **extras[0]}, {"params": params[2:], **extras[1]}]


def _loss(net, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 50, generator=gen), torch.randn(5, 1, generator=gen)
    return torch.nn.functional.mse_loss(net(x), y)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_same_parameters_as_standard_optimizer(name):
    cls, extras = OPTIMIZERS[name]
    ref, net = _net(), _net()
    standard = cls(_groups(ref, extras), weight_decay=0.01)
    fused = FusedOptimizer(_groups(net, extras), cls, weight_decay=0.01)
    schedules = [get_linear_schedule_with_warmup(o, num_warmup_steps=3, num_training_steps=20) for o in (standard, fused)]
    for step in range(12):
        _loss(ref, step).backward()
        standard.step()
        standard.zero_grad()
        _loss(net, step).backward()
        fused.step()
        fused.zero_grad()
        for s in schedules:
            s.step()
        # the scheduler's lr reached every per-parameter optimizer of each group
        assert [g["lr"] for g in standard.param_groups] == [g["lr"] for g in fused.param_groups]
        for opt, p in zip(fused.optimizers, net.parameters(), strict=True):
            group = 0 if any(p is q for q in list(net.parameters())[:2]) else 1
            assert opt.param_groups[0]["lr"] == standard.param_groups[group]["lr"]
    assert fused.param_groups[1]["lr"] < extras[1]["lr"]  # the schedule did change it
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not torch.equal(next(net.parameters()), next(_net().parameters()))  # and training moved them


def test_gradients_are_freed_during_backward():
    net = _net()
    FusedOptimizer(net.parameters(), torch.optim.Adam, lr=1e-3)
    first_weight = net[0].weight  # the last parameter whose gradient is ready in backward
    seen = {}

    def spy(p):  # runs after the fused step's hook on the same parameter
        seen["grads"] = [q.grad for q in net.parameters()]
        seen["moved"] = not torch.equal(net[4].weight, before)

    first_weight.register_post_accumulate_grad_hook(spy)
    before = net[4].weight.detach().clone()
    _loss(net, 0).backward()
    assert seen["grads"] == [None] * 6  # no gradient alive while backward is still running
    assert seen["moved"]  # the last layer was already updated inside backward
    assert all(p.grad is None for p in net.parameters())


def test_state_dict_round_trip_continues_identically():
    cls, extras = OPTIMIZERS["adam"]
    a = _net()
    opt_a = FusedOptimizer(_groups(a, extras), cls)
    for step in range(3):
        _loss(a, step).backward()
    b = _net()  # not deepcopy(a): that would copy a's hooks too
    b.load_state_dict(a.state_dict())
    opt_b = FusedOptimizer(_groups(b, extras), cls)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # torch loads without copying
    assert len(opt_b.state) == 6 and all(s["step"] == 3 for s in opt_b.state.values())
    opt_b.param_groups[1]["lr"] = 5e-3  # loading replaced the per-parameter groups: writes must still reach them
    assert [o.param_groups[0]["lr"] for o in opt_b.optimizers] == [1e-2] * 2 + [5e-3] * 4
    opt_b.param_groups[1]["lr"] = 1e-3
    for step in range(3, 6):
        _loss(a, step).backward()
        _loss(b, step).backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_remove_hooks_restores_plain_backward():
    net = _net()
    opt = FusedOptimizer(net.parameters(), torch.optim.SGD, lr=0.1)
    opt.remove_hooks()
    _loss(net, 0).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_trainer_drives_the_fused_optimizer():
    """transformers.Trainer with a FusedOptimizer ends where it ends with the standard AdamW."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from llmrepro.lm.models import ModelConfig, load_model

    data = Dataset.from_dict({"input_ids": [[i % 50 + 5 + j for j in range(16)] for i in range(12)]})
    data = data.map(lambda r: {"labels": r["input_ids"]})
    finals = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name="tiny-llama"))
        opt = (FusedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3) if fused
               else torch.optim.AdamW(model.parameters(), lr=1e-3))
        sched = get_linear_schedule_with_warmup(opt, 1, 3)
        args = TrainingArguments(output_dir="/tmp/unused", max_steps=3, per_device_train_batch_size=4,
                                 max_grad_norm=0, report_to=[], save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, use_cpu=True, seed=0)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    ({"gradient_accumulation_steps": 4}, "cannot accumulate gradients"),
    ({"max_grad_norm": 1.0}, "cannot clip gradients"),
    ({"grad_scaling": True}, "cannot use mixed-precision grad scaling"),
    ({"distributed": True}, "cannot run under distributed data parallel"),
])
def test_unsupported_setups_are_named(kwargs, words):
    why = unsupported(**kwargs)
    assert words in why and "\n" not in why
    assert unsupported() is None and unsupported(gradient_accumulation_steps=1, max_grad_norm=0) is None


def test_step_with_closure_and_frozen_parameters_are_refused():
    net = _net()
    with pytest.raises(UnsupportedError, match="closure"):
        FusedOptimizer(net.parameters(), torch.optim.SGD, lr=0.1).step(lambda: 0.0)
    net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        FusedOptimizer(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedOptimizer([p for p in net.parameters() if p.requires_grad], torch.optim.Adam, lr=-1.0)


# --- buckets: one optimizer (one foreach/fused call) per bucket, stepped when its last gradient has arrived ---

def _buckets(net, kind):
    """"group", per Linear (layer_buckets), or two buckets that each span both param groups."""
    from llmrepro.training.fused_optimizer import layer_buckets

    if kind in ("group", None):
        return kind
    if kind == "layer":
        return layer_buckets(net)
    p = list(net.parameters())
    return [[p[0], p[4], p[5]], [p[1], p[2], p[3]]]  # groups are p[:2] and p[2:]


@pytest.mark.parametrize("kind", ["group", "layer", "spanning"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_buckets_train_like_the_standard_optimizer(name, kind):
    """N steps with a schedule: the same parameters (1e-6) as the standard optimizer, for every bucketing."""
    cls, extras = OPTIMIZERS[name]
    ref, net = _net(), _net()
    standard = cls(_groups(ref, extras), weight_decay=0.01)
    fused = FusedOptimizer(_groups(net, extras), cls, buckets=_buckets(net, kind), weight_decay=0.01)
    schedules = [get_linear_schedule_with_warmup(o, num_warmup_steps=3, num_training_steps=20) for o in (standard, fused)]
    for step in range(12):
        for model, opt in ((ref, standard), (net, fused)):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
        for s in schedules:
            s.step()
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in standard.param_groups]
    assert len(fused.optimizers) == {"group": 2, "layer": 3, "spanning": 2}[kind]
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not torch.equal(next(net.parameters()), next(_net().parameters()))


def test_bucket_steps_once_all_its_gradients_arrived():
    """The last layer's bucket steps inside backward, before the first layer's gradients exist; then its
    gradients are gone while the first layer's bucket still waits."""
    from llmrepro.training.fused_optimizer import layer_buckets

    net = _net()
    FusedOptimizer(net.parameters(), torch.optim.Adam, buckets=layer_buckets(net), lr=1e-3)
    before, seen = net[4].weight.detach().clone(), {}

    def spy(_):  # the first layer's weight is not in the last layer's bucket
        seen.setdefault("moved", not torch.equal(net[4].weight, before))
        seen.setdefault("grads", [q.grad is not None for q in net.parameters()])

    net[0].weight.register_post_accumulate_grad_hook(spy)
    _loss(net, 0).backward()
    assert seen["moved"]
    assert seen["grads"][2:] == [False] * 4  # layers 2 and 3: stepped and freed already
    assert all(p.grad is None for p in net.parameters())


def test_step_flushes_a_partly_filled_bucket():
    """A parameter without a gradient (unused in this forward) is skipped, as the standard optimizer skips it."""
    cls = torch.optim.Adam
    ref, net = _net(), _net()
    standard = cls(ref.parameters(), lr=1e-2)
    fused = FusedOptimizer(net.parameters(), cls, buckets="group", lr=1e-2)  # one bucket, all six tensors
    for step in range(3):
        for model, opt in ((ref, standard), (net, fused)):
            x = torch.randn(5, 50, generator=torch.Generator().manual_seed(step))
            loss = model[2](model[0](x).relu()).pow(2).mean()  # the last Linear is unused
            loss.backward()
            if model is net:
                assert net[0].weight.grad is not None  # the bucket is still waiting for the last Linear
            opt.step()
            opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_bucketed_state_dict_round_trip():
    from llmrepro.training.fused_optimizer import layer_buckets

    a, b = _net(), _net()
    opt_a = FusedOptimizer(a.parameters(), torch.optim.Adam, buckets=layer_buckets(a), lr=1e-2)
    for step in range(3):
        _loss(a, step).backward()
    b.load_state_dict(a.state_dict())
    opt_b = FusedOptimizer(b.parameters(), torch.optim.Adam, buckets=layer_buckets(b), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_b.param_groups[0]["lr"] = 5e-3
    assert [o.param_groups[0]["lr"] for o in opt_b.optimizers] == [5e-3] * 3
    opt_b.param_groups[0]["lr"] = 1e-2
    for step in range(3, 6):
        _loss(a, step).backward()
        _loss(b, step).backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="bucket optimizers"):
        FusedOptimizer(_net().parameters(), torch.optim.Adam, lr=1e-2).load_state_dict(opt_a.state_dict())


def test_layer_buckets_group_decoder_layers():
    from llmrepro.lm.models import ModelConfig, load_model
    from llmrepro.training.fused_optimizer import layer_buckets

    model = load_model(ModelConfig(name="tiny-llama"))
    names = {id(p): n for n, p in model.named_parameters()}
    buckets = layer_buckets(model)
    assert [[names[id(p)] for p in b] for b in buckets] == [
        ["model.embed_tokens.weight"],
        *[[n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")] for i in (0, 1)],
        ["model.norm.weight"], ["lm_head.weight"]]
    assert len(buckets[1]) == 9  # q, k, v, o, gate, up, down, two norms


def test_bucketed_llm_with_reentrant_checkpointing_trains_like_adam():
    """A tiny Llama, per-layer buckets, reentrant gradient checkpointing (the source's): same weights as Adam."""
    from llmrepro.lm.models import ModelConfig, load_model
    from llmrepro.training.fused_optimizer import layer_buckets

    finals = []
    for fused in (False, True):
        model = load_model(ModelConfig(name="tiny-llama"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        opt = (FusedOptimizer(model.parameters(), torch.optim.Adam, buckets=layer_buckets(model), lr=1e-3) if fused
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        for step in range(4):
            ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_bad_buckets_are_refused():
    net = _net()
    p = list(net.parameters())
    with pytest.raises(ValueError, match="in two buckets"):
        FusedOptimizer(net.parameters(), torch.optim.SGD, buckets=[p, p[:1]], lr=0.1)
    with pytest.raises(ValueError, match="1 missing"):
        FusedOptimizer(net.parameters(), torch.optim.SGD, buckets=[p[1:]], lr=0.1)
    with pytest.raises(ValueError, match="buckets must be None, 'group'"):
        FusedOptimizer(net.parameters(), torch.optim.SGD, buckets="layer", lr=0.1)


def test_one_hook_per_bucket_once_the_order_is_known_and_a_changed_order_still_steps():
    """After a backward the bucket keeps only the hook of the parameter that completed it; when the order of
    arrival changes (here: which factor is nearer the output), it re-arms and still steps like Adam."""
    def run(make):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
        opt = make([a, b])
        counts = []
        for step in range(4):
            x = torch.randn(3, generator=torch.Generator().manual_seed(step))
            y = b * (a * x) if step % 2 == 0 else a * (b * x)  # the factor nearer the output gets its gradient first
            y.pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            counts.append(len(opt._buckets[0].hooks) if isinstance(opt, FusedOptimizer) else None)
        return [a.detach(), b.detach()], counts

    ref, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.1))
    got, counts = run(lambda ps: FusedOptimizer(ps, torch.optim.Adam, buckets="group", lr=0.1))
    for p, q in zip(ref, got, strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert counts == [1, 1, 1, 1]  # learnt in each backward (the order alternates), one hook left after it


def test_size_buckets_are_ddp_like():
    from llmrepro.training.fused_optimizer import size_buckets

    net = _net()  # 50x50 + 50, 50x50 + 50, 50 + 1 floats
    p = list(net.parameters())
    assert size_buckets(p) == [p[::-1]]  # 20 KB: one bucket
    cap = (50 * 50 + 50) * 4 / 2**20  # one Linear(50, 50)
    assert [[id(q) for q in b] for b in size_buckets(p, cap)] == [[id(q) for q in b] for b in (
        [p[5], p[4], p[3]], [p[2], p[1]], [p[0]])]


def test_step_hooks_still_run_without_torchs_profiler_wrapper():
    net = _net()
    opt = FusedOptimizer(net.parameters(), torch.optim.SGD, buckets="group", lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    _loss(net, 0).backward()
    opt.step()
    assert calls == [("pre", True), ("post", True)]
