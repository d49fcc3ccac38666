"""Batches of (input, target) windows from a 1-D token stream."""

from __future__ import annotations

import numpy as np
import torch

from moa_train.data.corpus import DataError


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 tensor on `device` (pinned and asynchronous for CUDA)."""
    t = torch.from_numpy(x.astype(np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple:
    """x[i] = tokens[s_i : s_i + length], y[i] = the same shifted by one."""
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


class RandomWindows:
    """Uniformly random windows (nanoGPT's get_batch), drawn from a seeded CPU generator whose state
    is checkpointed, so a resumed run draws exactly the batches an uninterrupted one would, on any
    device.

    The split is held as a tensor on the device (copied to the GPU once): a batch is its start
    offsets (`next_starts`, moved asynchronously), and `windows_at` gathers the windows there. The
    trainer's step does that gather itself, so a CUDA-graph step captures it and per step only the
    offsets move.

    Data parallelism: every rank draws the same `batch_size` windows (the global batch) and keeps
    its `rank`-th of `world` equal slices, so the data and the generator state do not depend on the
    number of ranks."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        last_start: bool = False,
    ):
        """`last_start`: the draws may start at the last offset len - block_size - 1 (nanoGPT's
        get_batch); false: one offset fewer (the draws of runs before
        trainer.sample_last_window)."""
        if len(tokens) <= block_size + 1:
            raise DataError(
                f"trainer.block_size: {block_size} needs a split of more than {block_size + 1} "
                f"tokens; this one has {len(tokens)}"
            )
        self.tokens, self.batch_size, self.block_size, self.device = (
            tokens,
            batch_size,
            block_size,
            device,
        )
        self.rank, self.world = rank, world
        self.n_starts = len(tokens) - block_size - (0 if last_start else 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.device_tokens = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(device)
        self.offsets = torch.arange(block_size + 1, device=device)

    def next_starts(self) -> torch.Tensor:
        """This rank's window offsets of the next global batch (batch_size / world,), on the
        device."""
        starts = torch.randint(self.n_starts, (self.batch_size,), generator=self.generator)
        return to_device(starts.view(self.world, -1)[self.rank].numpy(), self.device)

    def windows_at(self, starts: torch.Tensor) -> tuple:
        """(x, y) windows at `starts`: x[i] = tokens[s_i : s_i + block], y the same shifted by
        one."""
        chunk = self.device_tokens[starts[:, None] + self.offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def next(self) -> tuple:
        return self.windows_at(self.next_starts())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint loaded onto the GPU moved it
        self.generator.set_state(state["generator"].cpu())


def sequential_windows(tokens: np.ndarray, batch_size: int, block_size: int, device: torch.device):
    """Non-overlapping windows covering every token once as a target (a full pass); the last window
    is shorter."""
    n_targets = len(tokens) - 1
    starts = np.arange(0, n_targets, block_size)
    full = starts[starts + block_size <= n_targets]
    for i in range(0, len(full), batch_size):
        x, y = windows(tokens, full[i : i + batch_size], block_size)
        yield to_device(x, device), to_device(y, device)
    if len(full) < len(starts):
        tail = int(starts[-1])
        x, y = windows(tokens, np.array([tail]), n_targets - tail)
        yield to_device(x, device), to_device(y, device)
