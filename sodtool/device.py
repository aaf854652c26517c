"""Device selection, seeding, mixed precision and torch.distributed (DESIGN.md section 7).

On CUDA the stages use bf16 autocast and channels_last; several GPUs go through `torchrun`
(the env vars RANK / WORLD_SIZE / LOCAL_RANK), never a home-made scheme.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from sodtool.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda (this process's LOCAL_RANK under torchrun) when present, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' asked for, but CUDA is not available on this machine")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for samplers and augmentations."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def autocast(dev: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU runs stay fp32 and bit-reproducible)."""
    if enabled and dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(dev: torch.device) -> bool:
    """Start the process group when launched by torchrun with WORLD_SIZE > 1. Returns True if DDP."""
    import torch.distributed as dist

    rank, world, local_rank = dist_env()
    if world <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return True


def finish_distributed(completed: bool) -> None:
    """Tear the process group down (after a barrier when this rank completed) before exit.

    Left to interpreter shutdown, gloo's threads are destroyed in no set order and a rank whose
    work is done can still abort ("terminate called without an active exception", exit -6):
    seen in 1 of 90 two-rank torchrun launches on a loaded 2-core machine. A rank that failed
    skips the barrier, which its peers would never meet.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def is_main_process() -> bool:
    return dist_env()[0] == 0
