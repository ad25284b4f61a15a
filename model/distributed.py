"""Data-parallel training across processes: who this process is, and the few collectives training needs.

`torchrun` starts one process per rank and describes the launch in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The console entry point reads
it once (`DistContext.from_environ(os.environ)`) and passes the typed context down; nothing in
model/ reads the environment itself. (torch's own `env://` rendezvous, which `process_group` uses,
reads MASTER_ADDR/MASTER_PORT and torchrun's agent store itself: that is how torchrun means it to
be joined, on one machine or several.)

How a global batch of B rows is shared among W ranks (B % W == 0):

    global batch:  row 0 .. B/W-1 | B/W .. 2B/W-1 | ... | (W-1)B/W .. B-1
    rank:                0        |       1       | ... |        W-1

Each rank carries its own rows' LSTM state from window to window; DistributedDataParallel averages
the gradients, so every rank takes the same optimizer step the one-process run takes on all B rows
(the mean of W equal-sized means is the global mean). Every collective here is a no-op in a
one-process run, so the training loop has one code path.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Rank r > 0 draws its dropout masks from seed + DROPOUT_SEED_STRIDE * r: a different stream on
# every rank, and never one of the streams a run seeds itself (seed for the weights and rank 0's
# masks, seed + 1 for the data), which a plain `seed + rank` would be on rank 1.
DROPOUT_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine (they share its cores)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} outside {self.local_world_size} local processes")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DistContext:
        """The launch torchrun describes, or a one-process context when not launched by it."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        try:
            world = int(environ["WORLD_SIZE"])
            return cls(
                rank=int(environ["RANK"]),
                world_size=world,
                local_rank=int(environ.get("LOCAL_RANK", "0")),
                local_world_size=int(environ.get("LOCAL_WORLD_SIZE", str(world))),
            )
        except ValueError as exc:
            raise ValueError(f"malformed torchrun environment (RANK, WORLD_SIZE, LOCAL_*): {exc}") from exc

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, writes checkpoints and shows progress."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's share of a global batch of `batch_size` rows."""
        if batch_size % self.world_size:
            raise ValueError(
                f"--batch-size {batch_size} must be a multiple of the number of processes ({self.world_size}): "
                "every rank trains on an equal share of the rows"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def threads(self, requested: int, cpu_count: int | None) -> int:
        """Torch threads for this process: `requested`, or this machine's cores shared among its ranks."""
        return requested or max(1, (cpu_count or 1) // self.local_world_size)

    def dropout_seed(self, seed: int) -> int:
        return seed + DROPOUT_SEED_STRIDE * self.rank

    # ---- collectives: each is a no-op (or the local value) in a one-process run ----------------

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (in float64)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true if it is true on any rank: every rank takes the same decision."""
        if not self.enabled:
            return flags
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Rank 0's `values` on every rank (the others pass placeholders of the same length).
        Exact: float64 holds any Python float, and any int up to 2**53."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return [float(v) for v in t.tolist()]

    def gather_rows(self, tensors: list[Tensor]) -> list[Tensor]:
        """Every rank's tensors concatenated in rank order along dim 0 (the rows of the global
        batch), on rank 0; the local tensors elsewhere (not to be used there)."""
        if not self.enabled:
            return tensors
        out = []
        for t in tensors:
            parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.is_main else None
            dist.gather(t.contiguous(), parts, dst=0)
            out.append(torch.cat(parts) if parts is not None else t)
        return out

    def gather_each(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (same shape on each), in rank order, on rank 0; [tensor] elsewhere."""
        if not self.enabled:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(tensor.contiguous(), parts, dst=0)
        return parts if parts is not None else [tensor]

    def barrier(self) -> None:
        """Wait here until every rank arrives (the others wait while rank 0 writes files)."""
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


@contextmanager
def process_group(ctx: DistContext) -> Iterator[None]:
    """Join the job's gloo process group for the duration (nothing to join in a one-process run)."""
    if not ctx.enabled:
        yield
        return
    dist.init_process_group("gloo", init_method="env://", rank=ctx.rank, world_size=ctx.world_size)
    try:
        yield
        # Leave together: a rank that tears gloo down while its peer is still in a collective (or
        # whose DDP reducer, freed later by the garbage collector, still holds the group) can die in
        # gloo's threads at exit with "terminate called without an active exception" (SIGABRT).
        dist.barrier()
    finally:
        gc.collect()  # the DDP wrapper and its reducer go now, while the group is alive
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module to call in training: DistributedDataParallel (gradients averaged across ranks
    during backward, rank 0's weights broadcast at construction) or the model itself."""
    if not ctx.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)
