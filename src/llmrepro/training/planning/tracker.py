"""Live tensor memory by category during a training step: torch's `MemTracker`, reduced to global accounting.

`MemTracker` (torch.distributed._tools.mem_tracker, the tool torchtitan's memory estimator runs under
`FakeTensorMode`) follows every tensor storage an op creates and files it under a category: parameter, buffer,
gradient, activation (made in forward, or recomputed by activation checkpointing), temporary (made in backward:
activation gradients), optimizer state, other. `StepTracker` keeps that, and drops MemTracker's per-module
snapshots: they copy a snapshot for every active module on every op (quadratic in depth: 30 s for one step of a
36-layer model) and refuse a second iteration, while a planner needs only the totals. What it adds instead is
the peak of each *phase* of a step:

    forward           the forward pass, up to the loss
    backward:first    backward of the loss, the head and the last decoder block
    backward:middle   backward of the other blocks but the first
    backward:last     backward of the first decoder block and the embeddings
    update            gradient clipping, the optimizer step and zero_grad (`stage = "update"`)

For a stack of identical blocks each phase's peak is affine in the number of blocks, which is what lets
`measure` run a 2- and a 3-block model and extrapolate to 36 blocks exactly (`backward:middle` never exceeds
the larger of its neighbours, so it is not needed for that).

Relies on MemTracker internals of torch 2.13 (`_curr_mem_snap`, `_mod_tracker`, the AC flags); tests/training/
test_planner.py checks the result against a real step's allocator accounting.
"""

from __future__ import annotations

import weakref

from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

CATEGORIES = {  # MemTracker's category -> ours
    _MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporary", _MemRefType.OPT: "optimizer",
    _MemRefType.OTH: "other",
}
PHASES = ("forward", "backward:first", "backward:middle", "backward:last", "update")


def as_categories(snapshot: dict) -> dict[str, int]:
    """A MemTracker device snapshot as {our category: bytes} (plus "total")."""
    out = {name: int(snapshot.get(ref, 0)) for ref, name in CATEGORIES.items()}
    out["total"] = int(snapshot.get(_TOTAL_KEY, 0))
    return out


class StepTracker(MemTracker):
    """MemTracker with global and per-phase peaks only. `blocks`: the decoder blocks, first to last."""

    def __init__(self, blocks=(), cap_bytes: int | None = None) -> None:
        super().__init__()
        self.cap_bytes = cap_bytes  # raise torch.OutOfMemoryError when an op takes live tensors past this
        self._block_index = weakref.WeakKeyDictionary({b: i for i, b in enumerate(blocks)})
        self._block_names: dict[str, int] = {}
        self._n_blocks = len(blocks)
        self._known = weakref.WeakSet()
        self._bw_reached_block = False
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.stage = "forward"  # what runs outside backward: the step loop sets "update" around clip + step

    # --- module hooks: categorise parameters, follow activation-checkpoint recomputation ----------------------
    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self._known:
            self._known.add(module)
            self._track_params(module)
            if module in self._block_index:
                self._block_names[self._mod_tracker.get_known_fqn(module)] = self._block_index[module]
        if self._mod_tracker.is_bw:  # a checkpointed block recomputing its forward
            if self._ac_mod is None:
                self._ac_mod = weakref.ref(module)
                self._in_ac = True
        else:
            self._bw_reached_block = False

    def _track_params(self, module) -> None:
        """MemTracker's `_track_module_params_and_buffers`, but gradient hooks only on parameters that get gradients
        (it hooks every parameter, which fails on LoRA's frozen ones)."""
        def on_grad(grad) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        for p in module.parameters():
            self._update_and_maybe_create_winfos(p, _MemRefType.PARAM)
            if p.grad is not None:
                on_grad(p.grad)
            if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(on_grad), p.register_post_accumulate_grad_hook(lambda q: on_grad(q.grad)))
        for b in module.buffers():
            self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.cap_bytes is None:
            return super().__torch_dispatch__(func, types, args, kwargs)
        before = self.current()["total"]
        out = super().__torch_dispatch__(func, types, args, kwargs)
        after = self.current()["total"]
        if after > self.cap_bytes:
            import torch

            mib = 2**20
            raise torch.OutOfMemoryError(
                f"CPU memory cap: {func} tried to allocate {after - before} bytes ({(after - before) / mib:.2f} MiB) "
                f"with {before / mib:.2f} MiB of the cap's {self.cap_bytes / mib:.2f} MiB allocated")
        return out

    # --- peaks ---------------------------------------------------------------------------------------------------
    def phase(self) -> str:
        if self._mod_tracker.is_bw:
            active = [self._block_names[p] for p in self._mod_tracker.parents if p in self._block_names]
            if active:
                self._bw_reached_block = True
                i = min(active)
                return "backward:first" if i == self._n_blocks - 1 else "backward:last" if i == 0 else "backward:middle"
            return "backward:last" if self._bw_reached_block else "backward:first"
        return "update" if self._in_opt else self.stage

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY]
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(snap)
            phase = self.phase()
            if self.phase_peaks.get(phase, {}).get("total", -1) < total:
                self.phase_peaks[phase] = as_categories(snap)

    def peak(self) -> dict[str, int]:
        """{category: bytes} at the moment of the largest total, over all devices together."""
        snaps = list(self._peak_mem_snap.values())
        return as_categories(snaps[0]) if len(snaps) == 1 else _sum([as_categories(s) for s in snaps])

    def current(self) -> dict[str, int]:
        return _sum([as_categories(s) for s in self._curr_mem_snap.values()])


def _sum(snaps: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in snaps:
        for k, v in s.items():
            out[k] = out.get(k, 0) + v
    return out
