"""Marking as several processes under ``torchrun``: shards split by rank, errors agreed on.

``WORLD_SIZE`` > 1 in the environment (set by ``torchrun``) makes every rank join the default
process group (gloo on CPU, NCCL on CUDA) unless the caller already initialised one. The only
collectives are tiny: an error flag after each phase, so that one rank's refusal stops every rank
with exit 2 instead of leaving the others waiting, and the record's address.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from typing import Any

from radmark.errors import InputError, UsageError


class ProcessGroup:
    """The torchrun process group, or a stand-in for one process (rank 0 of 1)."""

    def __init__(self, device: str) -> None:
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.created = False
        self.device = device
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or "1")
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or "0")
        except ValueError:
            raise UsageError(
                "WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)"
            ) from None
        if world <= 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        cuda = device.startswith("cuda")
        if cuda and ":" not in device:
            self.device = f"cuda:{local_rank}"  # one GPU per local rank
        index = torch.device(self.device).index if cuda else None
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(
                f"rank with LOCAL_RANK={local_rank} wants {self.device} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; use --nproc-per-node "
                "at most the number of GPUs"
            )
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(torch.device(self.device))
            # Ranks finish their shares at different times and wait for each other; a crashed
            # rank makes torchrun stop the others, so the wait itself need not time out early.
            try:
                dist.init_process_group(
                    backend="nccl" if cuda else "gloo", timeout=_dt.timedelta(hours=24)
                )
            except (ValueError, RuntimeError) as exc:
                raise UsageError(
                    f"WORLD_SIZE={world} but the torch.distributed process group could not "
                    f"start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                    "launch with torchrun, or unset WORLD_SIZE for one process"
                ) from None
            self.created = True
        self.rank, self.world, self.local_rank = dist.get_rank(), dist.get_world_size(), local_rank

    def _comm_device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, error: Exception | None) -> None:
        """Raise on every rank if any rank failed in the phase just finished (a collective)."""
        if self.world > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([0 if error is None else 1], device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if error is None and int(flag.item()):
                raise InputError(
                    "another rank of this torchrun job failed (its error is printed above); "
                    "fix it and rerun with --resume"
                )
        if error is not None:
            raise error

    def broadcast(self, value: str | None) -> str | None:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def close(self, *, synchronise: bool = False) -> None:
        """Tear the group down. After a run every rank finished (``synchronise``), the ranks
        first meet at a barrier: a gloo peer torn down while another still talked to it aborted
        that process (SIGABRT, once in 9 test runs). After a failure there is no barrier: the
        other ranks may never arrive, and torchrun stops them."""
        if self.created:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                if synchronise and self.world > 1:
                    dist.barrier()
                dist.destroy_process_group()
