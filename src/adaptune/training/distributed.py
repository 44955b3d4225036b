"""Data-parallel training under ``torchrun``, with nothing to configure.

``torchrun --nproc-per-node N -m adaptune train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (``nccl`` on GPUs, ``gloo`` on CPU) and
the training loop wraps the model in ``DistributedDataParallel``. Only parameters that train are
synchronised (DDP skips frozen ones), so adapter tuning exchanges a few percent of the gradients
that full fine-tuning does.

Every rank sees the same global batches (a pure function of seed and epoch) and takes every
N-th example of each, so N processes with batch size B follow the same trajectory as one
process with batch size B, up to float summation order and dropout masks. Evaluation is sharded
the same way and the outputs are gathered, so every rank computes the same metrics. Only rank 0
writes files and draws the progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's part of a global batch: every world-th example."""
        return indices[self.rank :: self.world]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a list of one without torchrun)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str = "auto") -> Dist:
    """Join the torchrun job if there is one; pick this rank's device.

    Args:
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, or ``"cuda"``; under torchrun
            each rank takes ``cuda:LOCAL_RANK``.
    """
    from adaptune.models.loading import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = pick_device(device)
    if world <= 1:
        return Dist(device=base)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if base.type == "cuda":
        base = torch.device("cuda", local)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=base)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
