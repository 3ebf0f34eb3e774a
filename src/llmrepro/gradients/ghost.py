"""Ghost dot products: per-tensor gradient dot products of two samples without their gradients.

For a linear layer the per-sample gradient is G = sum_t delta_t x_t^T (`capture.Outer`), so

    <G_p, G_o> = sum_{t,s} (delta_p,t . delta_o,s) (x_p,t . x_o,s)

is the sum of the elementwise product of two T_p x T_o Gram matrices. Building G costs T d_in d_out flops and
d_in d_out memory per sample, each dot product d_in d_out more; the two Grams cost T_p T_o (d_in + d_out) flops
and T_p T_o memory per pair, so only the pairs that are read are computed (`needed`). The rule (`choose`,
the memory bound): a linear layer goes ghost when 2 T^2 <= d_in * d_out for the longest sample T of the run
(one choice per layer for the whole run, so every partition computes it the same way); embeddings, norms,
biases, tied weights (several contributions) and other modules' parameters stay materialized.

`cross` and `norms` are the `stream_dot_products` hooks: their inputs are {name: (B, n) tensor} for
materialized tensors and {name: PerSample} for ghost ones (`features`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrepro.gradients.capture import PerSample, Plan, wide

if TYPE_CHECKING:
    import torch


def choose(plan: Plan, max_tokens: int) -> dict[str, bool]:
    """{name: ghost?}: the rule 2 T^2 <= d_in * d_out for single linear (or Conv1D) weights, T = max_tokens."""
    out = {}
    for name in plan.params:
        out[name] = plan.one_linear(name) and 2 * max_tokens**2 <= plan.params[name].numel()
    return out


def features(grads: dict[str, PerSample], ghost: dict[str, bool]) -> dict[str, object]:
    """Captured gradients -> what `cross`/`norms` take: the factors where ghost, (B, n) gradients elsewhere."""
    return {n: g if ghost[n] else g.materialize() for n, g in grads.items()}


def _factors(g: PerSample) -> tuple[torch.Tensor, torch.Tensor]:
    (o,) = g.outers
    return wide(o.rows), wide(o.cols)


def ghost_cross(P: PerSample, Q: PerSample, needed: torch.Tensor | None = None) -> torch.Tensor:
    """(c, b) <G_p, G_o> for every p of P and o of Q (only the `needed` (c, b) pairs, 0 elsewhere: unlike a
    matrix product of materialized gradients, each pair costs T_p T_o (d_in + d_out) here), from their
    factors, one p at a time (b T_p T_o memory)."""
    import torch

    pr, pc = _factors(P)  # (c, Tp, r), (c, Tp, k)
    qr, qc = _factors(Q)  # (b, To, r), (b, To, k)
    out = torch.zeros(len(pr), len(qr), dtype=pr.dtype, device=pr.device)
    for i in range(len(pr)):
        js = torch.arange(len(qr)) if needed is None else needed[i].nonzero().flatten()
        if len(js) == 0:
            continue
        js = js.to(pr.device)
        rows = torch.matmul(qr[js], pr[i].T)  # (j, To, Tp): delta_o,s . delta_p,t
        cols = torch.matmul(qc[js], pc[i].T)  # (j, To, Tp): x_o,s . x_p,t
        out[i, js] = (rows * cols).sum((1, 2))
    return out


def ghost_norms(P: PerSample) -> torch.Tensor:
    """(c,) squared norms |G_p|^2 = sum_{t,s} (delta_t . delta_s)(x_t . x_s)."""
    import torch

    pr, pc = _factors(P)
    return (torch.bmm(pr, pr.transpose(1, 2)) * torch.bmm(pc, pc.transpose(1, 2))).sum((1, 2))


def cross(P: dict, Q: dict, needed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{name: (c, b)} dot products: ghost for factors (the `needed` pairs only), matrix products for
    materialized gradients."""
    return {n: ghost_cross(P[n], Q[n], needed) if isinstance(P[n], PerSample) else P[n] @ Q[n].T for n in P}


def norms(P: dict) -> dict[str, torch.Tensor]:
    """{name: (c,)} squared norms."""
    return {n: ghost_norms(g) if isinstance(g, PerSample) else (g * g).sum(1) for n, g in P.items()}
