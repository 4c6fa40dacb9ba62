"""fit-acg under ``torchrun``: joining the process group, and sums over its processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError


@dataclass
class Dist:
    """This process's place under ``torchrun`` (gloo on CPU, NCCL on GPU)."""

    rank: int
    world: int
    local_rank: int

    def sum(self, a: np.ndarray) -> np.ndarray:
        import torch.distributed as td

        t = torch.from_numpy(np.ascontiguousarray(a, np.float64))
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()


def setup_distributed(device: str | None) -> tuple[Dist | None, str]:
    """Join torchrun's process group when started under it (WORLD_SIZE > 1); returns (dist, device)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None, device
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > gpus:  # every rank sees the same numbers, so all stop here alike
            raise UsageError(
                f"torchrun started {per_node} processes on this machine but it has {gpus} GPU"
                f"{'' if gpus == 1 else 's'} (one process per GPU)",
                f"pass --nproc-per-node {gpus}, or --device cpu to train on the CPU with gloo",
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not td.is_initialized():
        td.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), local), device
