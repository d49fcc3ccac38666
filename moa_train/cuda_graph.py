"""CUDA-graph capture, shared by the training step (train/cuda_graph.py) and compiled decoding
(models/decoding.py): warm-up calls on a side stream, as a capture requires, then one capture.

A graph replays the kernels it recorded on the tensors it recorded: callers copy new inputs into
static buffers before `replay` and read outputs from the static tensors the captured call returned.
"""

from __future__ import annotations

import torch

# eager calls before a capture: compilation, cuBLAS handles and optimizer state are set up
WARMUP_STEPS = 3


def warm_up(fn, device: torch.device, n: int = WARMUP_STEPS) -> None:
    """`n` calls of `fn` on a side stream (compilation happens in the first), then a sync."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(n):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)


def capture(fn) -> tuple:
    """(graph, what `fn()` returned): `fn` recorded into a new CUDA graph, not run."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
