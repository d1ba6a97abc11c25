"""torchrun / DDP plumbing: process group, device choice, agreed step counts, gathers.

Training runs unchanged in one process or under ``torchrun --nproc_per_node N -m mtfm train``
(torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Backends: gloo on CPU, nccl
on GPU; nothing home-made.

Unequal batch counts: each rank reads its own shards, so ranks may hold different numbers of
batches in an epoch. A DDP step is a collective, so every rank must take the same number of
steps or the longer ranks hang. The ranks agree on the *largest* count; a rank that has run out
replays its last batch with the loss multiplied by zero ("padding step"): it still joins the
gradient all-reduce and still steps its optimizer with the averaged gradient, so optimizer
states stay identical on all ranks, and no rank's data is dropped. Padding steps are counted
and reported. (``torch.distributed.algorithms.Join`` shadows the all-reduce instead, but the
joined rank skips its optimizer steps, so Adam's moments drift apart between ranks.)

Evaluation gathers every rank's predictions before computing AUC/GAUC (a per-rank AUC
averaged over ranks is not the AUC, and a user's exposures may sit on several ranks).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, device, and whether a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun; a single-process context otherwise."""
    if not launched_by_torchrun():
        return DistContext(device=choose_device(requested_device, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, initialized=True)


def teardown(ctx: DistContext) -> None:
    """Leave together: a rank that destroys its gloo group while a peer still works can abort."""
    if ctx.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device(ctx: DistContext) -> torch.device:
    """nccl only moves CUDA tensors; gloo only CPU ones."""
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def all_max_int(ctx: DistContext, value: int) -> int:
    """The largest ``value`` over ranks (e.g. the agreed number of steps of an epoch)."""
    if not ctx.initialized:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_sum_floats(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (loss sums, exposure counts)."""
    if not ctx.initialized:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_array(ctx: DistContext, array: np.ndarray) -> np.ndarray:
    """Concatenate a 1-D or 2-D array over ranks in rank order (sizes may differ per rank)."""
    if not ctx.initialized:
        return array
    if array.dtype == np.bool_:  # not every backend reduces bool tensors
        return gather_array(ctx, array.astype(np.uint8)).astype(np.bool_)
    device = _comm_device(ctx)
    local = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    counts = [int(s.item()) for s in sizes]
    padded_shape = (max(counts), *local.shape[1:])
    padded = torch.zeros(padded_shape, dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().numpy()


def gather_arrays(ctx: DistContext, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``gather_array`` for each named array, in a fixed (sorted) order on every rank."""
    return {k: gather_array(ctx, arrays[k]) for k in sorted(arrays)}


def same_on_all_ranks(ctx: DistContext, tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (e.g. the parameters after DDP training)."""
    if not ctx.initialized:
        return True
    device = _comm_device(ctx)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    ok = torch.tensor([1 if torch.equal(flat, reference) else 0], dtype=torch.long, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
