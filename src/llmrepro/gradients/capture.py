"""Per-sample parameter gradients from one batched backward pass, kept as the factors they are made of.

For a linear layer y = W x the gradient of sample i's loss is a sum of outer products over its tokens,

    G_i = sum_t delta_i,t x_i,t^T            (d_out, d_in);  delta = d loss_i / d y_i,t,

so capturing each layer's inputs x (B, T, d_in) in the forward pass and its output gradients delta (B, T, d_out)
in one backward pass of sum_i loss_i gives every sample's gradient without vmap: samples never interact
(the model is in eval mode, attention stays within a row), so delta_i is d loss_i / d y_i, as in
`per_sample.input_grads`. The factors are what the factored projection (`factored.py`) and the ghost dot
products (`ghost.py`) work on; `PerSample.materialize()` builds the (B, n) gradients when they are needed.

    plan = capture_plan(model, per_sample.select_params(model, "parameters"))
    grads = capture(model, batch, "sft", plan)      # {name: PerSample}, in parameter order
    g = grads["model.layers.0.mlp.up_proj.weight"].materialize()   # (B, d_out * d_in)

What each parameter's gradient is made of, by the module that owns it (a weight shared by two modules, as
tied input and output embeddings, gets both contributions):
- `nn.Linear` weight (d_out, d_in): the outer products delta x^T; transformers' `Conv1D` (GPT-2) stores the
  transpose, (d_in, d_out): x delta^T; an `nn.Embedding` weight (V, d): onehot(id) delta^T, kept as the ids;
- a bias: sum_t delta_t;
- any other module's parameters (norms, ...): `torch.func.vjp` of that module alone, vmapped over samples on
  its captured inputs and output gradient (cheap: the module is re-run, not the model).

Why hooks and not a library: Opacus computes per-sample gradients (and their norms) the same way, but
neither it nor logix / dattri (LoGra) give the products *between* two samples' factors that ghost dot
products need, and both bring their own training or logging framework; the capture itself is a forward hook
and one `torch.autograd.grad` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmrepro.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmrepro.gradients.encoding import Paradigm


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64): products of factors are never taken in half precision."""
    import torch

    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class Outer:
    """One contribution sum_t a_t b_t^T to a (n_rows, n_cols) weight's per-sample gradient."""

    rows: torch.Tensor  # (B, T, n_rows) float, or (B, T) long: one-hot rows (an embedding lookup)
    cols: torch.Tensor  # (B, T, n_cols)
    n_rows: int

    @property
    def one_hot(self) -> bool:
        return not self.rows.is_floating_point()


@dataclass
class PerSample:
    """A parameter's per-sample gradients: outer-product factors and/or a directly computed (B, n) part."""

    shape: tuple[int, ...]
    outers: list[Outer] = field(default_factory=list)
    dense: torch.Tensor | None = None  # (B, n)

    @staticmethod
    def cat(parts: list[PerSample]) -> PerSample:
        """The samples of several captures in one (token dimensions zero-padded to the longest: padding
        tokens add nothing to any sum over tokens)."""
        import torch
        import torch.nn.functional as F

        def pad_cat(ts):
            t = max(x.shape[1] for x in ts)
            return torch.cat([F.pad(x, (0, 0) * (x.dim() - 2) + (0, t - x.shape[1])) for x in ts])

        first = parts[0]
        outers = [Outer(pad_cat([p.outers[j].rows for p in parts]), pad_cat([p.outers[j].cols for p in parts]),
                        o.n_rows) for j, o in enumerate(first.outers)]
        dense = None if first.dense is None else torch.cat([p.dense for p in parts])
        return PerSample(first.shape, outers, dense)

    def add_dense(self, part: torch.Tensor) -> None:
        self.dense = part if self.dense is None else self.dense + part

    def materialize(self) -> torch.Tensor:
        """(B, n) gradients (float32, or float64 for a float64 model), flattened as the parameter (row-major)."""
        import torch

        parts = [] if self.dense is None else [self.dense]
        for o in self.outers:
            b, cols = o.cols.shape[0], wide(o.cols)
            if o.one_hot:  # scatter-add delta into the rows of the ids: (B, V, d)
                g = torch.zeros(b, o.n_rows, cols.shape[-1], dtype=cols.dtype, device=cols.device)
                g.scatter_add_(1, o.rows[..., None].expand(-1, -1, cols.shape[-1]), cols)
            else:
                g = torch.einsum("btr,btc->brc", wide(o.rows), cols)
            parts.append(g.reshape(b, -1))
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


# ------------------------------------------------------------------------------------------------ the plan

LINEAR, CONV1D, EMBEDDING, BIAS, MODULE = "linear", "conv1d", "embedding", "bias", "module"


@dataclass
class Use:
    """One module's use of a parameter: how its per-sample gradient is formed there."""

    module: str  # the module's name
    attr: str  # the parameter's attribute on it
    kind: str  # linear | conv1d | embedding | bias | module


@dataclass
class Plan:
    """How every selected parameter's per-sample gradient is captured: uses per parameter name."""

    params: dict[str, torch.nn.Parameter]
    uses: dict[str, list[Use]]
    modules: dict[str, torch.nn.Module]

    def factorable(self, name: str) -> bool:
        """Whether the gradient is outer products only (a weight of linear, Conv1D or embedding modules)."""
        return all(u.kind in (LINEAR, CONV1D, EMBEDDING) for u in self.uses[name])

    def matrix_shape(self, name: str) -> tuple[int, int]:
        shape = tuple(self.params[name].shape)
        if len(shape) != 2:
            raise ValueError(f"{name}: not a matrix {shape}")
        return shape

    def one_linear(self, name: str) -> bool:
        """A single linear (or Conv1D) use: the gradient is one sum of dense outer products (ghost-able)."""
        return len(self.uses[name]) == 1 and self.uses[name][0].kind in (LINEAR, CONV1D)


def _kind(module, attr: str) -> str:
    import torch

    conv1d = None
    try:
        from transformers.pytorch_utils import Conv1D as conv1d
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if attr == "weight" and type(module) is torch.nn.Linear:
        return LINEAR
    if attr == "weight" and conv1d is not None and type(module) is conv1d:
        return CONV1D
    if attr == "weight" and type(module) is torch.nn.Embedding and module.max_norm is None:
        return EMBEDDING
    if attr == "bias" and (type(module) is torch.nn.Linear or (conv1d is not None and type(module) is conv1d)):
        return BIAS
    return MODULE


def capture_plan(model, params: dict[str, torch.nn.Parameter]) -> Plan:
    """Find the modules that own each parameter (`per_sample.select_params`'s dict) and how to capture it.

    Only exact `nn.Linear` / `Conv1D` / `nn.Embedding` types are factored (a subclass may compute something
    else in forward); everything else goes through the module's own vjp."""
    by_id = {id(p): n for n, p in params.items()}
    uses: dict[str, list[Use]] = {n: [] for n in params}
    modules = {}
    for mname, module in model.named_modules():  # a module reachable twice is hooked once
        for attr, p in module.named_parameters(recurse=False):
            if p is not None and id(p) in by_id:
                uses[by_id[id(p)]].append(Use(mname, attr, _kind(module, attr)))
                modules[mname] = module
    missing = [n for n, u in uses.items() if not u]
    if missing:
        raise UserError(f"no module owns parameter(s) {', '.join(missing[:3])}: cannot capture their gradients")
    return Plan(params, uses, modules)


# ------------------------------------------------------------------------------------------------ capture

def _batched_leaves(args, kwargs, b: int):
    import torch
    from torch.utils._pytree import tree_flatten

    flat, spec = tree_flatten((args, kwargs))
    batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b for t in flat]
    return flat, spec, batched


def _module_vjp(module, attrs: list[str], args, kwargs, grad_out, b: int) -> dict[str, torch.Tensor]:
    """{attr: (B, *shape)} per-sample gradients of `module`'s own parameters, by vmapping the vjp of the module
    alone over the captured inputs (a batch dimension of one inside) and output gradients."""
    from torch.func import functional_call, vjp, vmap
    from torch.utils._pytree import tree_unflatten

    params = {a: getattr(module, a).detach() for a in attrs}
    flat, spec, batched = _batched_leaves(args, kwargs, b)
    inputs = [t.detach() for t, is_b in zip(flat, batched, strict=True) if is_b]

    def one(p, xs, g):
        it = iter(xs)
        leaves = [next(it).unsqueeze(0) if is_b else t for t, is_b in zip(flat, batched, strict=True)]
        a, kw = tree_unflatten(leaves, spec)
        _, pull = vjp(lambda q: functional_call(module, q, a, kw), p)
        return pull(g.unsqueeze(0))[0]

    return vmap(one, in_dims=(None, 0, 0))(params, inputs, grad_out)


def capture(model, batch: dict, paradigm: Paradigm, plan: Plan) -> dict[str, PerSample]:
    """One batched forward and one backward pass (w.r.t. the hooked modules' outputs only: no parameter
    .grad is touched) -> every planned parameter's per-sample gradient, as factors."""
    import torch

    from llmrepro.gradients.per_sample import per_sample_loss

    dev = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    b = ids.shape[0]
    calls: list[tuple[str, tuple, dict, torch.Tensor]] = []

    def hook(name):
        def record(module, args, kwargs, out):
            if not isinstance(out, torch.Tensor):
                raise UserError(f"module {name} ({type(module).__name__}) returns {type(out).__name__}, not a "
                                "tensor: its parameters' gradients cannot be captured; use method: vmap")
            if out.dim() > 0 and out.shape[0] == 1 < b:  # run once for all samples (GPT-2's positions): broadcast
                out = out.expand(b, *out.shape[1:])  # here, so that its gradient arrives per sample
            if out.dim() == 0 or out.shape[0] != b:
                raise UserError(f"module {name} ({type(module).__name__}) gives output {tuple(out.shape)} for a "
                                f"batch of {b}: its per-sample gradients cannot be captured; use method: vmap")
            calls.append((name, args, kwargs, out))
            return out
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in plan.modules.items()]
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    losses = per_sample_loss(logits, batch["labels"].to(dev), paradigm)
    outs = [c[3] for c in calls]
    if not all(o.requires_grad for o in outs):
        raise UserError("a hooked module's output does not require grad: are the selected parameters frozen?")
    grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
    del logits, losses

    out = {n: PerSample(tuple(p.shape)) for n, p in plan.params.items()}
    by_module: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {}
    for (mname, args, kwargs, o), g in zip(calls, grads, strict=True):
        by_module.setdefault(mname, []).append((args, kwargs, torch.zeros_like(o) if g is None else g.detach()))
    for mname, module_calls in by_module.items():
        module = plan.modules[mname]
        mine = [(u, n) for n, us in plan.uses.items() for u in us if u.module == mname]
        generic = [u.attr for u, _ in mine if u.kind == MODULE]
        for args, kwargs, g in module_calls:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.dim() > 0 and x.shape[0] == 1 < b:  # the shared input of a broadcast output
                x = x.expand(b, *x.shape[1:])
            delta = g.reshape(b, -1, g.shape[-1])  # (B, T, d_out)
            for u, n in mine:
                if u.kind == EMBEDDING:
                    idx = x.reshape(b, -1)  # (B, T) ids
                    if module.padding_idx is not None:  # nn.Embedding gives its padding row no gradient
                        delta = delta * (idx != module.padding_idx)[..., None]
                    out[n].outers.append(Outer(idx, delta, module.num_embeddings))
                elif u.kind == BIAS:
                    out[n].add_dense(wide(delta).sum(1))
                elif u.kind in (LINEAR, CONV1D):
                    xs = x.detach().reshape(b, -1, x.shape[-1])  # (B, T, d_in)
                    out[n].outers.append(Outer(delta, xs, delta.shape[-1]) if u.kind == LINEAR
                                         else Outer(xs, delta, xs.shape[-1]))
            if generic:
                per = _module_vjp(module, generic, args, kwargs, g, b)
                for u, n in mine:
                    if u.kind == MODULE:
                        out[n].add_dense(wide(per[u.attr].reshape(b, -1)))
    for n, ps in out.items():
        if not ps.outers and ps.dense is None:  # the parameter's module was not used by this forward
            ps.dense = wide(torch.zeros(b, plan.params[n].numel(), device=dev, dtype=plan.params[n].dtype))
    return out


def materialize_all(grads: dict[str, PerSample]) -> dict[str, torch.Tensor]:
    """{name: (B, n)}: what `per_sample.per_sample_grads` returns, flattened per tensor."""
    return {n: g.materialize() for n, g in grads.items()}
