"""Rank coordination under torchrun: rank 0 alone claims, records and publishes a run directory; the other
ranks train in the same `.partial` directory and learn rank 0's decisions (or its one-line error) by broadcast.
"""

from __future__ import annotations

import os

from llmrepro.core.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process' rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", 0))


def setup() -> tuple[int, object]:
    """(rank, a gloo group for coordination) under torchrun with several processes, else (0, None)."""
    if world_size() == 1:
        return 0, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group()  # env:// from torchrun; Trainer (accelerate) reuses this group
    return dist.get_rank(), dist.new_group(backend="gloo")


def on_rank0(group, fn):
    """`fn()` on rank 0, its result or its UserError shared with every rank; plain `fn()` without torchrun."""
    if group is None:
        return fn()
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (None, fn())
        except UserError as err:
            box[0] = (str(err), None)
    dist.broadcast_object_list(box, src=0, group=group)
    error, result = box[0]
    if error:
        raise UserError(error)
    return result


def barrier(group) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group)
