"""The optimizer step fused into backward: each parameter is updated, and its gradient freed, as soon as
its gradient is ready, so the full set of gradients never exists at once (memory: P(1+s) instead of
P(2+s) for P parameters and s optimizer states per parameter, plus the largest single gradient).

    opt = FusedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4)
    sched = transformers.get_linear_schedule_with_warmup(opt, 10, 100)   # writes lr through param_groups
    loss.backward()    # every parameter is stepped here; its .grad is None afterwards
    opt.step(); sched.step(); opt.zero_grad()   # step/zero_grad are no-ops: loops and Trainer stay unchanged

This is the DTU thesis' "backprop trick": one optimizer per parameter, stepped in that parameter's
`Tensor.register_post_accumulate_grad_hook`, and a parent optimizer whose `param_groups` are virtual:
writing a key of a parent group (a scheduler setting `lr`) writes it to every per-parameter optimizer of
that group. The parent is a real `torch.optim.Optimizer`, so torch and Hugging Face schedulers accept it.

Why not torch's `torch.distributed.optim._apply_optimizer_in_backward`: it is private, hooks the
AccumulateGrad node through `view_as` (the pre-2.1 workaround for the public hook used here), keeps
per-parameter optimizers in tensor attributes, and has no param groups a scheduler could drive.
torchtune's `OptimizerInBackwardWrapper` (not a dependency here) only gathers state dicts for
checkpointing; it needs torchtune's own scheduler plumbing. So this module builds on the public hook.

What it cannot do (`unsupported` says so in one line, and recipe configs call it before any work):
gradient accumulation (each backward steps at once), gradient clipping (the global norm needs every
gradient first), mixed-precision grad scaling (the scaler must see every gradient for inf/NaN before a
step may happen), and distributed data parallel (the step would run before the gradient all-reduce).
"""

from __future__ import annotations

import torch

from llmrepro.training.optimizers import UnsupportedError, unsupported


class _VirtualGroup(dict):
    """A parent param group; every write (but `params`) is forwarded to its per-parameter optimizers' groups.

    The groups are looked up at each write: `Optimizer.load_state_dict` replaces them (accelerate, and so
    Trainer, reloads every optimizer's state dict once to place it on the device)."""

    def __init__(self, group: dict, optimizers: list[torch.optim.Optimizer]):
        super().__init__(group)
        self.optimizers = optimizers

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key != "params":
            for opt in self.optimizers:
                opt.param_groups[0][key] = value

    def setdefault(self, key, default=None):  # dict.setdefault bypasses __setitem__ (LRScheduler uses it)
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):  # pickle/deepcopy as a plain dict, without the optimizers
        return dict, (dict(self),)


class FusedOptimizer(torch.optim.Optimizer):
    """`optimizer_class` (SGD, Adam, AdamW, ...) stepped per parameter inside backward; see the module docstring.

    `params` and `defaults` are what `optimizer_class` takes (an iterable of tensors or of param-group dicts).
    """

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **defaults):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise UnsupportedError(unsupported(distributed=True))
        self.optimizer_class, self._kwargs = optimizer_class, defaults
        self.optimizers: list[torch.optim.Optimizer] = []
        self._hooks = []
        # The class's full defaults (betas, eps, ...), its own argument checks run once here.
        full = optimizer_class([torch.zeros(1, requires_grad=True)], **defaults).defaults
        super().__init__(params, full)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        hyper = {k: v for k, v in group.items() if k != "params"}
        optimizers = []
        for p in group["params"]:
            if not p.requires_grad:
                raise ValueError("FusedOptimizer: a parameter does not require grad; pass only trainable parameters")
            opt = self.optimizer_class([p], **self._kwargs)
            opt.param_groups[0].update(hyper)  # the group's own values (lr, betas, ...)
            optimizers.append(opt)
            self._hooks.append(p.register_post_accumulate_grad_hook(_step_and_free(opt)))
        self.optimizers += optimizers
        self.param_groups[-1] = _VirtualGroup(group, optimizers)

    @property
    def state(self) -> dict:
        """The per-parameter optimizers' states, keyed by parameter (read-only view)."""
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @state.setter
    def state(self, _value) -> None:  # Optimizer.__init__ assigns an empty state; the real one lives per parameter
        pass

    @torch.no_grad()
    def step(self, closure=None):
        """No-op: every parameter was stepped during backward. A closure is refused (it would re-run backward)."""
        if closure is not None:
            raise UnsupportedError("FusedOptimizer.step does not take a closure: parameters step during backward")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: each gradient is freed right after its parameter's step."""

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError(f"state dict holds {len(state_dict['optimizers'])} per-parameter optimizers, "
                             f"this optimizer has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)

    def remove_hooks(self) -> None:
        """Detach from the parameters: later backward passes leave gradients in `.grad` again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _step_and_free(opt: torch.optim.Optimizer):
    def hook(param: torch.Tensor) -> None:
        opt.step()
        param.grad = None

    return hook
