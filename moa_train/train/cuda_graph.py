"""The whole optimizer step (forward, backward, clipping, AdamW, over every micro-batch) captured
once in a CUDA graph and replayed each step.

At small sizes a training step is bound by the host launching hundreds of kernels; one graph replay
per step takes that away without changing what is computed. Requirements, met by the trainer when
`trainer.cuda_graphs` is on: AdamW built with `capturable=True` and tensor learning rates (the
schedule fills them in place), a few eager warm-up steps on a side stream before the capture,
gradients set to None when capturing (the graph's backward then writes fresh gradients on every
replay), and inputs of fixed shape copied into static buffers.
"""

from __future__ import annotations

from moa_train.cuda_graph import WARMUP_STEPS, capture

__all__ = ["WARMUP_STEPS", "CapturedStep"]


class CapturedStep:
    def __init__(self, body, batches: list):
        """body(batches, log_step) -> outputs: one optimizer step. Capturing records it; nothing
        runs yet."""
        self.static = [tuple(t.clone() for t in batch) for batch in batches]
        self.graph, self.outputs = capture(lambda: body(self.static, True))

    def replay(self, batches: list):
        """Run one step on `batches`; the outputs are static tensors, valid until the next
        replay."""
        for static, batch in zip(self.static, batches, strict=True):
            for s, b in zip(static, batch, strict=True):
                s.copy_(b)
        self.graph.replay()
        return self.outputs
