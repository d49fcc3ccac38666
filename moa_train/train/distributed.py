"""Data parallelism over the processes `torchrun` starts, with PyTorch's own stack: DDP, or FSDP2
(`fully_shard`).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process trains on `cuda:LOCAL_RANK` (NCCL) or on
the CPU (gloo). Every rank draws the same global batch and keeps its slice (data/batches.py,
data/translation.py), so a config trains the same on 1, 2 or 8 GPUs; gradients are averaged over the
ranks by DDP / FSDP, and the batch statistics of routing (models/routing.py) are summed over the
ranks inside the loss. Rank 0 alone writes (metrics, checkpoints, summary); checkpoints hold full,
unsharded tensors, so they load with any number of ranks.

Without torchrun (WORLD_SIZE unset or 1) there is no process group and everything here is the
identity.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from moa_train.collectives import global_sum, world_size  # noqa: F401 (public here too)


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's: global rank, number of ranks, rank on its node (its
    GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    env = os.environ
    return Dist(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def init() -> Dist:
    """Join torchrun's process group (once per process): gloo for CPU tensors, NCCL for CUDA ones
    where a GPU is visible, so `trainer.device=cpu` also works on a GPU machine."""
    d = from_env()
    if d.active and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(d.local_rank)
            dist.init_process_group(
                "cpu:gloo,cuda:nccl", device_id=torch.device("cuda", d.local_rank)
            )
        else:
            dist.init_process_group("gloo")
    return d


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, d: Dist) -> torch.device:
    """One GPU per process: `cuda` becomes `cuda:LOCAL_RANK`."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.active else device


def shared_run_stamp(d: Dist) -> str:
    """Rank 0's start time in the format of train.yaml's `hydra.run.dir`, so that every rank
    resolves one run folder (each rank's own clock could name a different one)."""
    stamp = [dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")]
    if d.active:
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


@contextmanager
def main_first(d: Dist):
    """Rank 0 runs the block first (it builds the shared data caches: downloads, tokenizers, token
    ids), then the other ranks run it and find the caches built."""
    if d.active and not d.main:
        dist.barrier()
    yield
    if d.active and d.main:
        dist.barrier()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# --- the model ------------------------------------------------------------------------------------


def wrap(
    model: torch.nn.Module, strategy: str, d: Dist, device: torch.device, bucket_mb: float
) -> torch.nn.Module:
    """The module the training step calls: DDP around the model, or the model with each block and
    then the root sharded by FSDP2 (in place: parameters become DTensors, so build the optimizer
    afterwards)."""
    if not d.active:
        return model
    if strategy == "fsdp":
        mesh = init_device_mesh(device.type, (d.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    # gradients as views into DDP's buckets: no copy of every gradient into its bucket before the
    # all-reduce
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        bucket_cap_mb=bucket_mb,
    )


def grad_sync(model: torch.nn.Module, sync: bool):
    """Gradient accumulation: the gradient all-reduce (DDP) or reduce-scatter (FSDP) runs only in
    the backward of the last micro-batch of a step. Returns the context to run the micro-batch's
    forward and backward in."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for logging: FSDP's grad norm is a replicated DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# --- collectives ----------------------------------------------------------------------------------


def agreed_stop(received: int | None, out_of_time: bool, d: Dist) -> tuple:
    """(the stop signal any rank has received or None, whether any rank is past trainer.max_time):
    the same answer on every rank, from one small all-reduce, so that all ranks write their
    checkpoint and stop at the same step."""
    if not d.active:
        return received, out_of_time
    # a CPU tensor: init() always gives the group gloo for those
    flags = torch.tensor([received or 0, int(out_of_time)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, late = flags.tolist()
    return signum or None, bool(late)


def global_max(x: torch.Tensor) -> int:
    """The largest of the ranks' values of a CPU integer scalar (the group always has gloo for
    those)."""
    if world_size() == 1:
        return int(x)
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank: the same answer on every rank."""
    return global_max(torch.tensor(int(flag))) > 0


def local_part(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter; a plain tensor as it is."""
    return p.to_local() if hasattr(p, "to_local") else p


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...]."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def rank_share(batches, d: Dist):
    """This rank's share of an evaluation: batch i goes to rank i % world; yields (batch, mine).
    Every rank steps through every round of `world` batches, so under FSDP (whose forward gathers
    parameters) all ranks make the same number of forward passes: a rank without a batch in the last
    round gets the round's first with mine=False (run it, do not count it)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == d.world:
            yield group[d.rank], True
            group = []
    if group:
        mine = d.rank < len(group)
        yield group[d.rank if mine else 0], mine


# --- checkpoints ----------------------------------------------------------------------------------
# One format for one process, DDP and FSDP: full (unsharded) tensors keyed by parameter name,
# gathered to rank 0's CPU memory when distributed, and loaded (and sharded again under FSDP) by
# every rank, whatever the world size.


def _options(d: Dist, saving: bool) -> StateDictOptions | None:
    return StateDictOptions(full_state_dict=True, cpu_offload=saving) if d.active else None


def model_state(model: torch.nn.Module, d: Dist) -> dict:
    """Full weights (on rank 0 only when distributed); every rank must call it (FSDP gathers)."""
    return get_model_state_dict(model, options=_options(d, saving=True))


def optimizer_state(model: torch.nn.Module, optimizer, d: Dist) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_options(d, saving=True))


def load_model_state(model: torch.nn.Module, state: dict, d: Dist) -> None:
    set_model_state_dict(model, state, options=_options(d, saving=False))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, d: Dist) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=_options(d, saving=False))


def rank_rng(saved, d: Dist) -> dict | None:
    """This rank's RNG state from a checkpoint, which holds one per rank that saved it (a single
    process saved a plain dict); None for a rank beyond those (resumed on more ranks): it keeps its
    own seed."""
    states = saved if isinstance(saved, list) else [saved]
    return states[d.rank] if d.rank < len(states) else None
