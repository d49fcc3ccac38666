"""The one CUDA-graph helper (moa_train/cuda_graph.py), exercised on a CPU: warm-up calls on a
side stream then one capture (torch.cuda's stream and graph objects replaced by recording fakes),
and compiled decoding's graph branch (models/decoding.Compiled) driven through it, whose tokens must
equal eager decoding's."""

from __future__ import annotations

import contextlib

import torch

import moa_train.cuda_graph as cg
from moa_train.models import decoding
from moa_train.models.conformance import tiny_config
from moa_train.models.lm import LanguageModel


class FakeCuda:
    """Records the calls the helper makes on torch.cuda."""

    def __init__(self):
        self.events, self.inside = [], None

    def Stream(self, device):
        return types_namespace(wait_stream=lambda s: self.events.append("side waits"))

    def current_stream(self, device):
        return types_namespace(wait_stream=lambda s: self.events.append("main waits"))

    @contextlib.contextmanager
    def stream(self, s):
        self.inside = "side"
        yield
        self.inside = None

    def synchronize(self, device):
        self.events.append("sync")

    class CUDAGraph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(self, g):
        self.inside = "capture"
        yield
        self.inside = None


def types_namespace(**kw):
    import types

    return types.SimpleNamespace(**kw)


def test_warm_up_runs_on_a_side_stream_then_syncs_and_capture_returns_the_output(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch, "cuda", fake)
    seen = []
    cg.warm_up(lambda: seen.append(fake.inside), "cuda", n=3)
    assert seen == ["side"] * 3
    assert fake.events == ["side waits", "main waits", "sync"]
    graph, out = cg.capture(lambda: seen.append(fake.inside) or "out")
    assert out == "out" and seen[-1] == "capture" and isinstance(graph, FakeCuda.CUDAGraph)


def test_compiled_decoding_through_the_graph_branch_equals_eager(monkeypatch):
    """The graph branch of Compiled: warm-up, capture, lengths put back, replay per step. A fake
    graph's replay runs the captured step again, so the tokens must be eager decoding's."""
    captured = []

    class ReplayGraph:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

    def fake_capture(fn):
        captured.append(fn)
        return ReplayGraph(fn), None

    monkeypatch.setattr(decoding, "capture", fake_capture)
    monkeypatch.setattr(decoding, "warm_up", lambda fn, device, n=3: [fn() for _ in range(n)])
    torch.manual_seed(0)
    lm = LanguageModel(tiny_config("mha"), 50).eval()
    prompt, lengths = torch.randint(2, 50, (2, 5)), torch.tensor([5, 3])

    def greedy(steps):
        with torch.no_grad(), steps:
            logits, out = steps.prefill(prompt, lengths), []
            for _ in range(6):
                out.append(logits.argmax(-1).clone())
                logits = steps.step(out[-1])
        return torch.stack(out, 1)

    eager = greedy(decoding.open_steps(lm, 2, 16, "cpu"))
    steps = decoding.open_steps(lm, 2, 16, "cpu", compile="eager")
    steps.graphs = True  # the CUDA branch, with the fakes above
    assert torch.equal(greedy(steps), eager)
    assert len(captured) == 1  # one span (no bucket): one capture
