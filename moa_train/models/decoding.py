"""One way to step a decoder, shared by `generate` (moa-generate), greedy and beam search, and
`moa-bench --decode`: `open_steps(model, ...)` gives a `Steps` whose `prefill` (the LM's prompts)
and `step(tokens)` (one new token per row) return the logits (B, V) of each row's next token, and
whose `select(rows)` keeps rows (beam search).

Strategies, chosen by `open_steps`:
- cached, eager: the model's KV caches (`init_cache`, `prefill`, `decode_step`); an LM's step
  attends over the positions reached so far (`span`), not the whole cache;
- cached, compiled (`compile=True`, the LM): the decode step compiled with torch.compile
  (fullgraph, static shapes) and, on CUDA, captured in a CUDA graph, one per span bucket
  (`span_bucket` positions; 0: one graph over the whole cache). Compiled steps and their caches are
  kept on the model per (batch, max_len, dtype, bucket), so a second call with the same shapes
  neither compiles nor captures again; `release_compiled` drops them (a graph replays what it
  captured: change a module's decoding settings, and the kept steps must go);
- recompute: a full forward over each row's tokens at every step, for a model whose attention
  declares it cannot use a cache, a forward that ignored its cache (`CacheNotUsed`, with a warning),
  or `use_cache=False`. The same tokens, slower.

`Windowed` wraps any of them for an LM that goes on past its max_seq_len (`generate(window=True)`):
the strategy above while every row fits, then full forwards over each row's last max_seq_len tokens
(nanoGPT's sample: the window's first token at position 0).
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from moa_train.cuda_graph import capture, warm_up
from moa_train.models.kv_cache import CacheNotUsed, has_kv_cache


class Steps:
    """prefill / step / select / close; `mode` names the strategy, `compile_s` the seconds spent
    compiling and capturing in this call. The logits a step returns may be overwritten by the next
    step (the compiled strategy's static buffer): draw from them first."""

    mode = "recompute"
    compile_s = 0.0

    def prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def select(self, rows: Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Give the model its full forwards back (caches detached)."""

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def overflow_note(self) -> str | None:
        return None


class Recompute(Steps):
    """Each row's tokens kept, and a full forward over them at every step (right padding is
    invisible to the real tokens under the causal mask). An encoder-decoder's source (memory,
    src_mask) goes to `model.decode`. `slide`: a row holding max_len tokens drops its first to take
    the next (a sliding window; otherwise a row never passes max_len)."""

    def __init__(
        self, model, batch_size: int, max_len: int, device, memory=None, src_mask=None, slide=False
    ):
        self.model, self.memory, self.src_mask, self.slide = model, memory, src_mask, slide
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def _last_logits(self) -> Tensor:
        tokens = self.tokens[:, : int(self.lengths.max())]
        if self.memory is not None:  # search: every row holds the same number of tokens
            return self.model.decode(tokens, self.memory, self.src_mask, last_only=True)[:, -1]
        logits, _ = self.model(tokens)
        return logits[torch.arange(len(self.lengths), device=logits.device), self.lengths - 1]

    def prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        self.tokens[:, : idx.shape[1]] = idx
        self.lengths.copy_(lengths)
        return self._last_logits()

    def push(self, tokens: Tensor) -> None:
        """Append one token per row, no forward."""
        if self.slide:
            full = self.lengths == self.tokens.shape[1]
            self.tokens = torch.where(full[:, None], self.tokens.roll(-1, 1), self.tokens)
            self.lengths -= full.long()
        self.tokens[torch.arange(len(tokens), device=tokens.device), self.lengths] = tokens
        self.lengths += 1

    def step(self, tokens: Tensor) -> Tensor:
        self.push(tokens)
        return self._last_logits()

    def select(self, rows: Tensor) -> None:
        self.tokens, self.lengths = self.tokens[rows], self.lengths[rows]
        if self.memory is not None:
            self.memory, self.src_mask = self.memory[rows], self.src_mask[rows]


class Cached(Steps):
    """Eager steps through the model's caches. An LM's step attends over the positions any row has
    reached (counted here: reading cache.lengths would sync). Where an attention's forward ignored
    its cache (CacheNotUsed, raised by the first prefill or step), it says so through `warn` and
    goes on by full forwards (a `Recompute`) from the same tokens."""

    mode = "cached"

    def __init__(self, model, cache, warn=None):
        self.model, self.cache, self.span, self.warn = model, cache, None, warn
        self.fallback = None

    def _recompute(self, exc: CacheNotUsed) -> Recompute:
        self.model.release_cache()
        if self.warn is not None:
            self.warn(str(exc))
        c = self.cache
        self.fallback = Recompute(
            self.model, c.batch_size, c.max_len, c.lengths.device, c.memory, c.src_mask
        )
        self.mode = "recompute (the cache was ignored)"
        return self.fallback

    def prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        self.span = idx.shape[1]
        try:
            return self.model.prefill(idx, lengths, self.cache)
        except CacheNotUsed as exc:
            return self._recompute(exc).prefill(idx, lengths)

    def step(self, tokens: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback.step(tokens)
        if self.cache.memory is None:
            self.span += 1
            return self.model.decode_step(tokens, self.cache, span=self.span)
        # an encoder-decoder (short targets: no span); its first step may find an ignored cache
        try:
            return self.model.decode_step(tokens, self.cache)
        except CacheNotUsed as exc:
            return self._recompute(exc).step(tokens)

    def select(self, rows: Tensor) -> None:
        (self.fallback or self.cache).select(rows)

    def close(self) -> None:
        self.model.release_cache()

    def overflow_note(self) -> str | None:
        """A line on the tokens a cache stored differently from the full forward (moas_kv's pool
        fallback), or None. A host sync: call once, after decoding."""
        n = 0 if self.fallback is not None else self.cache.overflow()
        if not n:
            return None
        return (
            f"{n} token-layer(s) overflowed the KV head pool and stored the fallback scheme (MQA) "
            "instead of their routed one (raise model.kv_pool_slack for an exact cache)"
        )


class Windowed(Steps):
    """An LM's steps past `window` positions (its max_seq_len): through `inner` (any strategy above,
    opened for at most `window` positions) while the widest row fits, then full forwards over each
    row's last `window` tokens, a sliding `Recompute` that has kept every row's tokens from the
    start. Rows that still fit then decode as before (a full forward gives the cached logits)."""

    def __init__(self, inner: Steps, model, batch_size: int, window: int, device):
        self.inner, self.window, self.width, self.note = inner, window, 0, None
        self.rest = Recompute(model, batch_size, window, device, slide=True)
        self.mode = f"{inner.mode}, then a sliding window of {window}"
        self.slid = False  # whether a row has passed `window` positions

    def prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        self.width = idx.shape[1]
        self.rest.tokens[:, : idx.shape[1]] = idx
        self.rest.lengths.copy_(lengths)
        return self.inner.prefill(idx, lengths)

    def step(self, tokens: Tensor) -> Tensor:
        self.width += 1
        if self.width <= self.window:
            self.rest.push(tokens)
            return self.inner.step(tokens)
        if not self.slid:  # the widest row needs position `window`: the cache has none
            self.note, self.slid = self.inner.overflow_note(), True
            self.inner.close()
        return self.rest.step(tokens)

    def select(self, rows: Tensor) -> None:
        raise RuntimeError("a sliding window keeps its rows: beam search runs other steps")

    def close(self) -> None:
        if not self.slid:
            self.inner.close()

    def overflow_note(self) -> str | None:
        return self.note if self.slid else self.inner.overflow_note()


def decode_loop(steps: Steps, logits: Tensor, budget: int, draw, on_token=None) -> list:
    """`budget` tokens per row (B,) drawn one after the other from the logits after the prompt: the
    loop of `generate` and `moa-bench --decode`. The last token is never fed back.
    `on_token(tokens)` returning True ends the loop early (every row done: a stop string). No host
    sync (unless `draw` or `on_token` makes one)."""
    out = []
    for step in range(budget):
        tokens = draw(logits)
        out.append(tokens)
        if on_token is not None and on_token(tokens):
            break
        if step + 1 < budget:
            logits = steps.step(tokens)
    return out


def bucket_span(position: int, max_len: int, bucket: int) -> int:
    """The span a step at `position` attends over: position + 1 rounded up to a multiple of
    `bucket`, at most max_len."""
    return min(max_len, -(-(position + 1) // bucket) * bucket)


def decode_spans(prompt_len: int, new_tokens: int, bucket: int) -> list:
    """[(span, steps)] in decoding order: step s writes position prompt_len + s and attends over the
    first `span` positions, its position + 1 rounded up to a multiple of `bucket` (at most
    prompt_len + new_tokens); bucket 0: [(None, new_tokens)], every step over the whole cache."""
    if bucket == 0:
        return [(None, new_tokens)]
    max_len, out = prompt_len + new_tokens, []
    for pos in range(prompt_len, max_len):
        span = bucket_span(pos, max_len, bucket)
        if out and out[-1][0] == span:
            out[-1] = (span, out[-1][1] + 1)
        else:
            out.append((span, 1))
    return out


def _decode_into(model, tokens: Tensor, logits: Tensor, cache, span: int | None) -> None:
    """The compiled unit: one decode step from the static `tokens` into the static `logits`."""
    logits.copy_(model.decode_step(tokens, cache, span=span))


class Compiled(Cached):
    """Compiled decode steps of an LM, on CUDA each captured in a CUDA graph, one per span bucket;
    built once per (batch, max_len, dtype, bucket) and kept on the model (`compiled_steps`). Rows
    cannot be selected (a graph holds its tensors)."""

    def __init__(self, model, cache, bucket: int, device: torch.device, backend: str):
        super().__init__(model, cache)
        self.bucket, self.device = bucket, device
        b, dtype = cache.batch_size, next(model.parameters()).dtype
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.logits = torch.zeros(b, model.vocab_size, device=device, dtype=dtype)
        self.runs: dict = {}  # span -> a callable running one step
        self.fn = torch.compile(_decode_into, fullgraph=True, dynamic=False, backend=backend)
        self.graphs = device.type == "cuda"
        self.mode = "compiled + CUDA graph" if self.graphs else "compiled"

    def _run(self, span: int | None):
        """The step of `span`, compiled and captured at its first use. Warm-up and capture write
        K/V at the rows' next positions, which the real step then overwrites, and advance lengths
        by the warm-up steps, put back after."""
        if span in self.runs:
            return self.runs[span]
        t0, lengths = time.perf_counter(), self.cache.lengths.clone()
        step = functools.partial(self.fn, self.model, self.tokens, self.logits, self.cache, span)

        def warm_step():  # at the rows' next positions, never past them
            self.cache.lengths.copy_(lengths)
            step()

        if self.graphs:
            warm_up(warm_step, self.device)
            graph, _ = capture(step)  # captured, not run: lengths are put back below
            run = graph.replay
        else:
            warm_step()
            run = step
        self.cache.lengths.copy_(lengths)
        self.compile_s += time.perf_counter() - t0
        self.runs[span] = run
        return run

    def _span(self) -> int | None:
        return bucket_span(self.span, self.cache.max_len, self.bucket) if self.bucket else None

    def step(self, tokens: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback.step(tokens)
        run = self._run(self._span())
        self.span += 1
        self.tokens.copy_(tokens)
        run()
        # the static buffer itself, no copy: valid until the next step (decode_loop draws from it
        # first)
        return self.logits

    def select(self, rows: Tensor) -> None:
        raise RuntimeError("compiled decoding keeps its rows: beam search runs eager steps")

    def close(self) -> None:
        # the caches stay attached: the graphs hold them, and the next call with these shapes
        # attaches them again; a full forward sets them aside (CacheHolder)
        pass


def compiled_steps(
    model, batch_size: int, max_len: int, device, bucket: int, backend: str, warn=None
) -> Compiled:
    """The model's Compiled steps for these shapes, built at the first call and kept on the model
    (`model.compiled_steps`, freed with it)."""
    dtype = next(model.parameters()).dtype
    kept = model.__dict__.setdefault("compiled_steps", {})
    key = (batch_size, max_len, dtype, bucket, str(device), backend)
    steps = kept.get(key)
    if steps is None:
        # a graph per span: raise dynamo's recompile limit for the buckets of one cache
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, 8 * (max_len // max(bucket, 1) + 2)
        )
        cache = model.init_cache(batch_size, max_len, device=device)
        steps = kept[key] = Compiled(model, cache, bucket, torch.device(device), backend)
    else:
        model.attach_cache(steps.cache)
        steps.compile_s, steps.fallback = 0.0, None
    steps.warn = warn
    return steps


def release_compiled(model) -> None:
    """Drop the compiled steps kept on `model` (and their caches): call after changing how its
    modules decode (e.g. `generation.set_inference_routing`), since a kept graph replays the code
    it captured."""
    kept = model.__dict__.pop("compiled_steps", {})
    if any(steps.cache is model.cache for steps in kept.values()):
        model.release_cache()


def open_steps(
    model,
    batch_size: int,
    max_len: int,
    device,
    *,
    use_cache: bool = True,
    compile: bool | str = False,
    span_bucket: int = 0,
    memory: Tensor | None = None,
    src_mask: Tensor | None = None,
    warn=None,
) -> Steps:
    """The decoding strategy for `batch_size` rows of up to `max_len` positions (see the module
    docstring). `compile`: True (inductor) or a torch.compile backend's name. `memory`, `src_mask`:
    an encoder-decoder's source. `warn(message)`: told when a forward ignored its cache."""
    if not (use_cache and has_kv_cache(model)):
        return Recompute(model, batch_size, max_len, device, memory, src_mask)
    if memory is not None:
        return Cached(model, model.init_cache(memory, src_mask, max_len), warn)
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        return compiled_steps(model, batch_size, max_len, device, span_bucket, backend, warn)
    return Cached(model, model.init_cache(batch_size, max_len, device=device), warn)
