"""The optimizer step fused into backward: parameters are updated, and their gradients freed, while backward is
still running, so the full set of gradients never exists at once (memory: P(1+s) plus one bucket of gradients,
instead of P(2+s), for P parameter bytes and s optimizer states per parameter).

    opt = FusedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4)                  # per parameter
    opt = FusedOptimizer(model.parameters(), torch.optim.AdamW, buckets=size_buckets(model.parameters()), lr=1e-4)
    sched = transformers.get_linear_schedule_with_warmup(opt, 10, 100)   # writes lr through param_groups
    loss.backward()    # parameters are stepped here; their .grad is None afterwards
    opt.step(); sched.step(); opt.zero_grad()   # step flushes what backward left; loops and Trainer stay unchanged

Buckets. With `buckets=None` every parameter tensor gets its own optimizer, stepped in that parameter's
`Tensor.register_post_accumulate_grad_hook`: the DTU thesis' "backprop trick" (`MotherOptimizer`; torchtune's
optimizer-in-backward works the same way), kept as the default for its reproduction. Each parameter's step
is then a separate call into the optimizer, which is what makes the trick slow (1.6x-1.7x the standard
step on the thesis' small net here, 1.6x for an LLM on an H100). With buckets (lists of parameters:
`size_buckets(params)`, at most 25 MB of gradients each in reverse parameter order like
DistributedDataParallel's; `layer_buckets(model)`, one per decoder layer; or "group", one per param group)
each bucket has one optimizer, which steps all of the bucket's parameters in one foreach/fused call when
the bucket's last gradient has accumulated, and then frees those gradients. Peak gradient memory is then
about the largest bucket, and a small model is a single bucket: one optimizer call per step, as standard.

The parent optimizer's `param_groups` are virtual: writing a key of a parent group (a scheduler setting `lr`)
writes it to the matching group of every bucket's optimizer. The parent is a real `torch.optim.Optimizer`, so
torch and Hugging Face schedulers accept it. `step()` steps any bucket whose gradients arrived only in part
(parameters unused in this forward), so it updates exactly what a standard optimizer would: call it after
every backward, as the training loops do.

Why not torch's `torch.distributed.optim._apply_optimizer_in_backward`: it is private, per parameter only,
hooks the AccumulateGrad node through `view_as`, and has no param groups a scheduler could drive. torchtune's
`OptimizerInBackwardWrapper` (not a dependency here) only gathers state dicts for checkpointing.

What it cannot do (`unsupported` says so in one line, and recipe configs call it before any work):
gradient accumulation (each backward steps at once), gradient clipping (the global norm needs every
gradient first), mixed-precision grad scaling (the scaler must see every gradient for inf/NaN before a
step may happen), and distributed data parallel (the step would run before the gradient all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.optim.optimizer as _optim_hooks

from llmrepro.training.optimizers import UnsupportedError, unsupported

__all__ = ["FusedOptimizer", "UnsupportedError", "layer_buckets", "size_buckets", "unsupported"]


class _VirtualGroup(dict):
    """A parent param group; every write (but `params`) is forwarded to the matching group of each bucket's optimizer.

    The targets are (optimizer, group index) pairs, and the group is looked up at each write:
    `Optimizer.load_state_dict` replaces the dicts (accelerate, and so Trainer, reloads every optimizer's state
    dict once to place it on the device)."""

    def __init__(self, group: dict, targets: list[tuple[torch.optim.Optimizer, int]]):
        super().__init__(group)
        self.targets = targets

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key != "params":
            for opt, index in self.targets:
                opt.param_groups[index][key] = value

    def setdefault(self, key, default=None):  # dict.setdefault bypasses __setitem__ (LRScheduler uses it)
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):  # pickle/deepcopy as a plain dict, without the optimizers
        return dict, (dict(self),)


class _Bucket:
    """Parameters stepped together: one optimizer, stepped when every parameter's gradient has accumulated.

    Readiness is checked on the gradients themselves (all not None: the bucket frees them after each step),
    so it does not depend on the order they arrive in. Only one hook stays armed once that order is known:
    during a backward with every parameter hooked, the parameter whose gradient completes the bucket is
    remembered and the other hooks removed (each hook is a call from autograd into Python: on a small net
    they cost more than the step). Should that parameter's gradient ever arrive before the others, its hook
    re-arms them all; a bucket left incomplete (a parameter unused in this forward) steps in `flush`."""

    __slots__ = ("optimizer", "params", "hooks", "last")

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        self.optimizer, self.params, self.hooks, self.last = optimizer, params, {}, None
        self.arm()

    def arm(self) -> None:
        """Hook every parameter (the order of arrival is to be learnt again)."""
        for p in self.params:
            if id(p) not in self.hooks:
                self.hooks[id(p)] = p.register_post_accumulate_grad_hook(self.hook)
        self.last = None

    def hook(self, param: torch.Tensor) -> None:
        """The post-accumulate-grad hook."""
        if len(self.params) == 1:
            self.step()
        elif self.complete():
            if self.last is None:  # learnt: this parameter's gradient completes the bucket
                self.last = param
                for key in [k for k in self.hooks if k != id(param)]:
                    self.hooks.pop(key).remove()
            self.step()
        elif self.last is param:  # the order changed: hook them all again
            self.arm()

    def complete(self) -> bool:
        for p in self.params:  # a loop, not all(...): this runs in every backward
            if p.grad is None:
                return False
        return True

    def step(self) -> None:
        self.optimizer.step()  # skips parameters whose gradient is None, as any torch optimizer does
        for p in self.params:
            p.grad = None

    def flush(self) -> None:
        """Step a bucket whose gradients arrived only in part (a parameter unused in this forward)."""
        for p in self.params:
            if p.grad is not None:
                self.step()
                return

    def remove(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()


class FusedOptimizer(torch.optim.Optimizer):
    """`optimizer_class` (SGD, Adam, AdamW, ...) stepped inside backward, per parameter or per bucket.

    `params` and `defaults` are what `optimizer_class` takes (an iterable of tensors or of param-group dicts).
    `buckets`: None (one optimizer per parameter tensor, the source's way), "group" (one per param group),
    or lists of parameters that together hold every parameter exactly once (e.g. `layer_buckets(model)`);
    a bucket may span param groups (its optimizer then has one group per parent group it touches).
    """

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 buckets: str | list[list[torch.Tensor]] | None = None, **defaults):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise UnsupportedError(unsupported(distributed=True))
        if isinstance(buckets, str) and buckets != "group":
            raise ValueError(f"FusedOptimizer: buckets must be None, 'group' or lists of parameters, not {buckets!r}")
        self.optimizer_class, self._kwargs = optimizer_class, defaults
        self.optimizers: list[torch.optim.Optimizer] = []
        self._buckets: list[_Bucket] = []
        self._building = True  # add_param_group only collects the groups until all are known
        # The class's full defaults (betas, eps, ...), its own argument checks run once here.
        full = optimizer_class([torch.zeros(1, requires_grad=True)], **defaults).defaults
        super().__init__(params, full)
        self._building = False
        self.bucketing = buckets if isinstance(buckets, str) or buckets is None else "custom"
        self._build(list(range(len(self.param_groups))), buckets)

    # ------------------------------------------------------------------------------------------ building

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.requires_grad:
                raise ValueError("FusedOptimizer: a parameter does not require grad; pass only trainable parameters")
        if not self._building:  # a group added later: per parameter, or one bucket of its own
            self._build([len(self.param_groups) - 1], None if self.bucketing is None else "group")

    def _build(self, group_ids: list[int], buckets) -> None:
        """Bucket optimizers and hooks for the parameters of the param groups `group_ids`."""
        group_of = {id(p): i for i in group_ids for p in self.param_groups[i]["params"]}
        if buckets is None:
            lists = [[p] for i in group_ids for p in self.param_groups[i]["params"]]
        elif buckets == "group":
            lists = [list(self.param_groups[i]["params"]) for i in group_ids]
        else:
            lists = [list(b) for b in buckets if len(b)]
            seen = [id(p) for b in lists for p in b]
            if len(seen) != len(set(seen)):
                raise ValueError("FusedOptimizer: a parameter is in two buckets; give each parameter one bucket")
            if set(seen) != set(group_of):
                raise ValueError("FusedOptimizer: the buckets must hold exactly the optimizer's parameters "
                                 f"({len(set(seen) - set(group_of))} extra, {len(set(group_of) - set(seen))} missing)")
        targets: dict[int, list] = {i: [] for i in group_ids}
        for params in lists:
            parts: dict[int, list] = {}  # parent group -> this bucket's parameters in it, in order
            for p in params:
                parts.setdefault(group_of[id(p)], []).append(p)
            groups = [{**{k: v for k, v in self.param_groups[i].items() if k != "params"}, "params": ps}
                      for i, ps in parts.items()]
            opt = self.optimizer_class(groups, **self._kwargs)
            for j, i in enumerate(parts):
                targets[i].append((opt, j))
            self.optimizers.append(opt)
            self._buckets.append(_Bucket(opt, params))
        for i in group_ids:
            self.param_groups[i] = _VirtualGroup(self.param_groups[i], targets[i])

    # ------------------------------------------------------------------------------------------ stepping

    @property
    def state(self) -> dict:
        """The bucket optimizers' states, keyed by parameter (read-only view)."""
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @state.setter
    def state(self, _value) -> None:  # Optimizer.__init__ assigns an empty state; the real one lives per bucket
        pass

    def _patch_step_function(self) -> None:
        """Leave `step` unwrapped: torch wraps every optimizer's step in a profiler `record_function`, which
        costs more than this step's work (the bucket optimizers' own steps stay wrapped, and profiled);
        `step` runs the step hooks itself."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def step(self, closure=None):
        """Steps the buckets whose gradients arrived only in part (parameters unused in this forward); every
        other parameter was stepped during backward. A closure is refused (it would re-run backward)."""
        if closure is not None:
            raise UnsupportedError("FusedOptimizer.step does not take a closure: parameters step during backward")
        for hook in (*_optim_hooks._global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        for bucket in self._buckets:
            bucket.flush()  # each bucket optimizer's step runs under no_grad itself
        for hook in (*_optim_hooks._global_optimizer_post_hooks.values(), *self._optimizer_step_post_hooks.values()):
            hook(self, (), {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: each gradient is freed right after its bucket's step."""

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "buckets": [len(b.params) for b in self._buckets],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        sizes = state_dict.get("buckets", [1] * len(state_dict["optimizers"]))
        if sizes != [len(b.params) for b in self._buckets]:
            raise ValueError(f"state dict holds {len(sizes)} bucket optimizers ({sum(sizes)} parameters), this "
                             f"optimizer has {len(self._buckets)} ({sum(len(b.params) for b in self._buckets)})")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)

    def remove_hooks(self) -> None:
        """Detach from the parameters: later backward passes leave gradients in `.grad` again."""
        for bucket in self._buckets:
            bucket.remove()

    @property
    def largest_bucket_bytes(self) -> int:
        """Gradient bytes of the largest bucket: what the fused step keeps alive at most, beyond the model."""
        return max(sum(p.numel() * p.element_size() for p in b.params) for b in self._buckets)


def layer_buckets(model: torch.nn.Module, params: Iterable[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
    """Trainable parameters (or `params`) grouped by repeated block: everything under `model.layers.3` (or
    `transformer.h.3`, ...) in one bucket; a parameter outside the blocks in its module's bucket
    (`model.embed_tokens`, `lm_head`, `model.norm`). Buckets are in the model's parameter order."""
    wanted = None if params is None else {id(p) for p in params}
    buckets: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if (wanted is None and not p.requires_grad) or (wanted is not None and id(p) not in wanted):
            continue
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = ".".join(parts[:digit + 1]) if digit is not None else ".".join(parts[:-1]) or name
        buckets.setdefault(key, []).append(p)
    return list(buckets.values())


def size_buckets(params: Iterable[torch.Tensor], cap_mb: float = 25.0) -> list[list[torch.Tensor]]:
    """Parameters in buckets of at most `cap_mb` of gradients (a larger tensor alone in its own), filled in
    reverse order, the order backward usually produces gradients in: DistributedDataParallel's gradient
    buckets (its bucket_cap_mb defaults to 25). A small model is one bucket: one optimizer call per step."""
    buckets: list[list[torch.Tensor]] = []
    size = cap = cap_mb * 2**20
    for p in reversed([p for p in params if p.requires_grad]):
        nbytes = p.numel() * p.element_size()
        if size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets
