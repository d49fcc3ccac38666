"""moa-bench --decode: what each attention variant costs to serve, against the card's copy bandwidth
and the baseline a user would pick instead (Hugging Face transformers' `generate()`).

    moa-bench --decode                   # every model + the transformers rows, GPT-2 small [GPU]
    moa-bench --decode --no-hf           # the models only (split a run to fit a time budget)
    moa-bench --decode --hf-only         # the transformers rows only
    moa-bench --decode --tables-only     # rebuild inference.md and .png from inference.json
    moa-bench --decode --decode-size tiny --models mha,moas_dynamic --no-hf   # CPU, seconds

First the copy bandwidth of the device (a device-to-device copy of a large buffer, the best of
several; read + write bytes per second). Then for every model of `bench_presets()` (each registered
variant, by its presets) at the size chosen (`gpt2`: 12 layers, d 768, 12 heads, vocabulary 50304,
bf16 on CUDA; `tiny`: CPU seconds):
- routed variants get balanced routing first (`balance_routers`): the last layer of each router is
  set so that its logits are whitened, mean-free projections of the router's input (calibrated on
  random tokens, layer by layer), so choices spread evenly; the shares a forward on fresh tokens
  realises are measured and recorded;
- prefill: batch 8 x 512-token prompts through the static KV cache (`LanguageModel.prefill`), eager;
- decode: batch 1 and 64, 512-token prompts, 256 new tokens, greedy; the step (`decode_step` +
  argmax) compiled with torch.compile and captured in a CUDA graph on CUDA, falling back to compiled
  without graph or to eager (the row's `mode` says which and why); plain eager on CPU. Each step
  attends over the cache's first `span` positions, its position + 1 rounded up to a multiple of
  `--span-bucket` (64: four spans, each compiled and captured), as a server would, rather than over
  the whole max_len; `--span-bucket 0` (the default, the setting of the committed figures) attends
  over the whole cache;
- KV bytes per token: analytic (`kv_bytes_per_token`) and measured (the bytes of the K/V tensors the
  cache allocated / tokens it holds; also the allocator's count) and realised (what the tokens held
  take: a head pool's used slots), peak memory per batch;
- the bound: the bytes one decode step must read (every parameter once + the K/V of the batch at the
  mean context length, prompt + new / 2) / the copy bandwidth; the share of the bound the measured
  step achieves;
- where a target is missed, a torch.profiler trace of one decode step (the prefill before it
  untraced; the profiler's stderr messages kept in the record, out of the terminal): top kernels,
  kernel time vs step time (gaps).
A variant that routes over attention schemes (moas_dynamic) gets a second row with
inference_routing=top1, labelled <model>@top1 in the tables and in the terminal.

The baseline: transformers' LlamaForCausalLM at the same size (hidden 768, 12 layers, 12 heads,
SwiGLU intermediate 3072, vocabulary 50304, tied embeddings) with 12 / 4 / 1 K/V heads, random init,
bf16, SDPA attention, generate() greedy for exactly 256 new tokens: (a) the dynamic cache, eager;
(b) the static cache, which transformers compiles itself on CUDA (CompileConfig's defaults:
torch.compile, mode reduce-overhead). Failures are recorded in the row.

Results merge into <out>/inference.json (keyed by size/model, each entry naming the run that
measured it); <out>/inference.md and inference.png are rebuilt from the whole file. <out> is
outputs/bench/ under the working directory unless --out names another folder; --publish writes into
the checkout's docs/results/ (the committed figures).

A busy machine is noticed, not trusted (common.contention): the copy-bandwidth probe at the start
and after each model (against the floor of an idle card of its class, and against the first probe),
the spread of each decode measurement's repetitions, negative trace gaps (kernels taking longer
than the step they ran in), and on a CPU the load average at the start. A flagged run or row
records `contention: {flagged, reasons}`, gets a WARNING line in the terminal and a **[contention]**
marker in inference.md.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moa_train.bench import common
from moa_train.bench.common import SIZES as MODEL_SIZES
from moa_train.config import bench_presets
from moa_train.errors import Parser
from moa_train.models.decoding import decode_spans
from moa_train.models.roles import ROUTER, declared_modules
from moa_train.tables import table_lines
from moa_train.timing import repeat_times

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSize:
    size: str  # common.SIZES' model sizes: the same overrides as the training benchmark's
    prompt_len: int
    new_tokens: int
    prefill_batch: int
    batches: tuple  # decode batches: (small, large)
    hf_kv_heads: tuple  # K/V heads of the transformers rows: n_head (mha-equivalent) first
    copy_bytes: int  # buffer of the bandwidth measurement on CUDA


SIZES = {
    "gpt2": DecodeSize("gpt2", 512, 256, 8, (1, 64), (12, 4, 1), 2**30),
    "tiny": DecodeSize("tiny", 16, 8, 2, (1, 4), (4, 2, 1), 2**30),
}
REPS = 3  # timed repetitions of each measurement (the median is reported)
# the decode benchmark's targets: (models, batch index, share of the bandwidth bound)
TARGETS = ((("mha", "gqa", "mqa"), 0, 0.20), (("mha", "moas_static", "moas_dynamic"), 1, 0.50))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def timed(fn, reps: int = REPS, warmup: bool = True) -> float:
    """Median seconds of `reps` calls of fn() (after one untimed call, unless warmed up already)."""
    return statistics.median(repeat_times(fn, reps, warmup=int(warmup)))


# --- the model ------------------------------------------------------------------------------------


def build(size: DecodeSize, model_name: str, device: torch.device):
    """(LanguageModel in eval mode on `device`, fp32, its overrides): the training benchmark's size
    of the model."""
    from moa_train.models.lm import build_model

    cfg, overrides = common.compose_cfg(size.size, model_name, 1, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.vocab_size).to(device).eval()
    return model, overrides


def routers(model) -> list:
    """Each attention's routers: the submodules it declares with role ROUTER (a Linear or a small
    network ending in one)."""
    return [router for block in model.blocks for router in declared_modules(block.attn, ROUTER)]


def last_linear_input(model, router: nn.Module, calib: torch.Tensor) -> tuple:
    """(the router's last Linear, the inputs (N, features) it sees on a forward of `calib`). A
    router may apply that Linear's weight itself (MoAS pads it: F.linear), so its input is also
    taken as the output of the module before. The inputs are None where neither is seen (a router
    whose weights its attention applies itself, as MAE's gate does)."""
    leaves = [m for m in router.modules() if not list(m.children())]
    last = max(i for i, m in enumerate(leaves) if isinstance(m, nn.Linear))
    seen = {}

    # a hook returning a value would replace the module's output
    def keep(name: str, value) -> None:
        seen.setdefault(name, value)

    hooks = [leaves[last].register_forward_hook(lambda mod, args, out: keep("in", args[0]))]
    if last > 0:
        hooks.append(
            leaves[last - 1].register_forward_hook(lambda mod, args, out: keep("before", out))
        )
    try:
        model(calib)
    finally:
        for hook in hooks:
            hook.remove()
    inputs = seen.get("in", seen.get("before"))
    return leaves[last], None if inputs is None else inputs.flatten(0, -2)


@torch.no_grad()
def balance_routers(model, calib: torch.Tensor, scale: float = 3.0) -> None:
    """Set each router's last Linear so that its logits are `scale` x orthonormal projections of the
    whitened, mean-free input it sees on `calib` tokens (B, T): every choice then gets an equal
    share of Gaussian-like inputs. The weight rows are kept orthogonal to the input's mean (which a
    bias-free router cannot subtract), and any bias is zeroed. Layer by layer, since each router's
    setting changes the inputs of the next layers."""
    gen = torch.Generator().manual_seed(0)
    for router in routers(model):
        layer, h = last_linear_input(model, router, calib)
        if h is None:  # not balanced: its inputs cannot be seen
            continue
        h = h.double().cpu()
        mu = h.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(h.T))
        keep = evals > evals.max() * 1e-6
        # x -> whitened coordinates: (x - mu) @ w_white
        w_white = evecs[:, keep] / evals[keep].sqrt()
        m = mu @ w_white
        rows = torch.cat(
            [m[:, None], torch.randn(len(m), layer.out_features, generator=gen, dtype=h.dtype)], 1
        )
        q = torch.linalg.qr(rows).Q[:, 1:]  # orthonormal, orthogonal to the mean's whitened image
        # (choices, features); weight @ mu = 0
        layer.weight.copy_((scale * (w_white @ q).T).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.zero_()


@torch.no_grad()
def routing_shares(model, idx: torch.Tensor) -> dict | None:
    """The routing a forward on `idx` realises: per choice, the share of the top-k assignments (or
    of each token's argmax for a soft router) and the mean probability, averaged over layers; the
    worst layer's largest distance of a share from uniform."""
    _, records = model(idx)
    records = [r for r in records if r is not None]
    if not records:
        return None
    shares, probs = [], []
    for r in records:
        chosen = r.chosen if r.chosen is not None else r.probs.argmax(-1, keepdim=True)
        counts = torch.bincount(chosen.flatten(), minlength=r.probs.shape[-1]).double()
        shares.append(counts / counts.sum())
        probs.append(r.probs.double().mean(0))
    shares, probs = torch.stack(shares).cpu(), torch.stack(probs).cpu()
    uniform = 1 / shares.shape[1]
    return {
        "choices": list(records[0].choice_names),
        "share": [round(float(s), 4) for s in shares.mean(0)],
        "mean_prob": [round(float(p), 4) for p in probs.mean(0)],
        "worst_dev": round(float((shares - uniform).abs().max()), 4),
        "of": "top-k assignments" if records[0].chosen is not None else "argmax of soft gates",
    }


def prompts(batch: int, length: int, vocab: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, length), generator=gen).to(device)


# --- decoding -------------------------------------------------------------------------------------


def param_bytes(model) -> int:
    """Bytes of every parameter once (the tied head once): what a decode step reads, at most, of the
    weights."""
    return sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )


@torch.no_grad()
def measure_prefill(model, size: DecodeSize, device: torch.device) -> dict:
    idx = prompts(size.prefill_batch, size.prompt_len, model.vocab_size, device, seed=1)
    cache = model.init_cache(size.prefill_batch, size.prompt_len, device)
    lengths = torch.full((size.prefill_batch,), size.prompt_len, device=device)
    seconds = timed(lambda: model.prefill(idx, lengths, cache))
    return {
        "batch": size.prefill_batch,
        "prompt_len": size.prompt_len,
        "mode": "eager",
        "ms": 1000 * seconds,
        "tokens_per_s": size.prefill_batch * size.prompt_len / seconds,
    }


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def decode_steps(model, batch: int, max_len: int, device: torch.device, args, compile: bool):
    """(Steps, mode): the strategy `generate` opens for these shapes (models/decoding.py), compiled
    (+ CUDA graph) on CUDA unless `compile` is false; eager on a CPU."""
    from moa_train.models.decoding import open_steps

    compiled = compile and args.compile and device.type == "cuda"
    steps = open_steps(
        model, batch, max_len, device, compile=compiled, span_bucket=args.span_bucket
    )
    mode = steps.mode if device.type == "cuda" else "eager (CPU: no compile, no CUDA graph)"
    return steps, mode


@torch.no_grad()
def measure_decode(
    model,
    size: DecodeSize,
    batch: int,
    device: torch.device,
    bandwidth: float,
    args,
    compile: bool = True,
) -> dict:
    """Greedy decoding of `batch` rows through the steps `generate` uses (`decode_steps`): prefill,
    then `new_tokens` decode steps timed (median of REPS, after a first run that compiles), the loop
    `generate` runs (models/decoding.decode_loop)."""
    from moa_train.models.decoding import decode_loop, open_steps
    from moa_train.models.kv_cache import kv_bytes_per_token

    gc.collect()  # the previous batch's graph and cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    max_len = size.prompt_len + size.new_tokens
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    steps, mode = decode_steps(model, batch, max_len, device, args, compile)
    cache = steps.cache
    alloc = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
    idx = prompts(batch, size.prompt_len, model.vocab_size, device, seed=2)
    lengths = torch.full((batch,), size.prompt_len, device=device)

    prefilled = {}

    def prefill() -> None:  # untimed, before each run
        prefilled["logits"] = steps.prefill(idx, lengths)

    def decode() -> None:
        decode_loop(steps, prefilled["logits"], size.new_tokens + 1, greedy)

    def run(reps: int = 1) -> list:
        return repeat_times(decode, reps, setup=prefill)

    try:
        run()  # compiles and captures
    except Exception as exc:  # any failure is a result: recorded, then the eager steps
        torch._dynamo.reset()
        steps.close()
        mode = f"eager (compile failed: {one_line(exc)})"
        steps = open_steps(model, batch, max_len, device)
        cache = steps.cache
        run()
    compile_s = steps.compile_s
    reps = run(REPS)
    step_s = statistics.median(reps) / size.new_tokens
    # the cache's (init_cache allocates in the parameters' dtype)
    dtype = next(model.parameters()).dtype
    kv_token = kv_bytes_per_token(model, dtype)
    read = param_bytes(model) + batch * kv_token * (size.prompt_len + size.new_tokens / 2)
    bound_s = read / bandwidth
    kv_bytes = cache.nbytes()  # the K/V tensors the cache allocated (a head pool: its slots)
    out = {
        "batch": batch,
        "new_tokens": size.new_tokens,
        "mode": mode,
        "compile_s": round(compile_s, 1),
        "span_bucket": args.span_bucket,
        "spans": [s for s, _ in decode_spans(size.prompt_len, size.new_tokens, args.span_bucket)],
        "step_ms": 1000 * step_s,
        "step_ms_windows": [1000 * t / size.new_tokens for t in reps],
        "tokens_per_s": batch / step_s,
        "kv_bytes_per_token_measured": kv_bytes / (batch * max_len),
        # what the tokens held really take (a head pool: its used slots; a static cache: the
        # allocation)
        "kv_bytes_per_token_realised": cache.realised_bytes_per_token(),
        "kv_alloc_bytes": alloc,
        "kv_bytes": kv_bytes,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "read_bytes": read,
        "bound_ms": 1000 * bound_s,
        "share_of_bound": bound_s / step_s,
    }
    if args.trace and compile:

        def prepared_step():
            tokens = greedy(steps.prefill(idx, lengths))  # outside the trace: the step alone
            return lambda: steps.step(tokens)

        out["_trace"] = functools.partial(trace_step, prepared_step, device, 1000 * step_s)
    steps.close()
    return out


@torch.no_grad()
def measure_generate(model, size: DecodeSize, batch: int, device: torch.device, compile) -> dict:
    """Decode-only tokens/s of `generate`'s own path (moa_train.generation._generate_ids: prompts
    as id lists, greedy, `compile` as generate takes it), timed from the first token drawn (after a
    device sync there) to the ids back on the host; median of REPS after a first run."""
    from moa_train.generation import _generate_ids

    ids = prompts(batch, size.prompt_len, model.vocab_size, device, seed=2).tolist()
    times = []

    def first_token(tokens):
        if len(times) == 0:
            common.sync(device)
            times.append(time.perf_counter())

    def run() -> float:
        times.clear()
        _generate_ids(model, ids, size.new_tokens + 1, True, greedy, first_token, None, compile)
        return time.perf_counter() - times[0]

    run()
    seconds = statistics.median(run() for _ in range(REPS))
    return {"batch": batch, "tokens_per_s": batch * size.new_tokens / seconds}


def trace_step(prepare, device: torch.device, step_ms: float, top: int = 10) -> dict:
    """A torch.profiler trace of one decode step (the function `prepare()` returns; prepare runs
    untraced): the top kernels (CPU ops on a CPU) by self time, their sum, and the step's measured
    time less that sum (the gaps: launches, host work, idle). What the profiler writes to stderr
    stays out of the terminal: its lines are kept in the record (`profiler_stderr`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    run = prepare()
    common.sync(device)
    with common.captured_stderr() as messages:
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            run()
            common.sync(device)
        events = prof.key_averages()
    rows = []
    for evt in events:
        t = (
            (getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0))
            if cuda
            else evt.self_cpu_time_total
        )
        if t > 0 and not (cuda and evt.key.startswith("cuda")):  # runtime API calls are not kernels
            rows.append((t / 1000, evt.key[:100], evt.count))
    rows.sort(reverse=True)
    kernel_ms = sum(ms for ms, _, _ in rows)
    note = (
        "no kernels recorded (inside a CUDA graph, not traced here?)" if cuda and not rows else None
    )
    return {
        "of": "CUDA kernels" if cuda else "CPU ops",
        "note": note,
        "kernel_ms": kernel_ms,
        "step_ms": step_ms,
        "gaps_ms": step_ms - kernel_ms,
        "n_kernels": sum(c for _, _, c in rows),
        "top": [{"ms": ms, "kernel": k, "calls": c} for ms, k, c in rows[:top]],
        "profiler_stderr": [line[:200] for line in dict.fromkeys(messages)][:10],
    }


def missed(model_name: str, batch_index: int, share: float) -> float | None:
    """The target's share of the bound where this (model, batch) has one and `share` falls short of
    it."""
    for models, index, floor in TARGETS:
        if model_name in models and index == batch_index and share < floor:
            return floor
    return None


def measure_row(
    model,
    model_name: str,
    size: DecodeSize,
    device: torch.device,
    bandwidth: float,
    args,
    label: str,
) -> dict:
    from moa_train.models.kv_cache import kv_bytes_per_token

    # the most K/V heads a token stores (a head pool's: its widest scheme)
    heads = model.init_cache(1, 1).self_layers()[0].max_heads
    model.release_cache()
    entry = {
        "kv_heads": heads,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "param_bytes": param_bytes(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "kv_bytes_per_token": kv_bytes_per_token(model, next(model.parameters()).dtype),
    }
    entry["prefill"] = measure_prefill(model, size, device)
    entry["decode"], entry["decode_eager"], entry["generate"] = {}, {}, {}
    for i, batch in enumerate(size.batches):
        d = measure_decode(model, size, batch, device, bandwidth, args)
        if args.paths:
            compiled = args.compile and device.type == "cuda"
            entry["generate"][str(batch)] = measure_generate(model, size, batch, device, compiled)
            if compiled:
                eager = measure_decode(model, size, batch, device, bandwidth, args, compile=False)
                entry["decode_eager"][str(batch)] = {
                    k: eager[k] for k in ("mode", "step_ms", "tokens_per_s")
                }
        trace = d.pop("_trace", None)
        if trace is not None and missed(model_name, i, d["share_of_bound"]) is not None:
            d["trace"] = trace()
        entry["decode"][str(batch)] = d
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info(
            "  %s batch %d: %s, %.0f tok/s, %.1f%% of the bound",
            label,
            batch,
            d["mode"],
            d["tokens_per_s"],
            100 * d["share_of_bound"],
        )
    last = entry["decode"][str(size.batches[-1])]
    entry["kv_bytes_per_token_measured"] = last["kv_bytes_per_token_measured"]
    entry["kv_bytes_per_token_realised"] = last["kv_bytes_per_token_realised"]
    entry["contention"] = row_contention(entry, device)
    return entry


def row_contention(entry: dict, device: torch.device) -> dict:
    """The contention signals of a model row's own figures: the spread of each batch's timed
    decode repetitions, and the gaps of its traces."""
    from moa_train.metrics.flops import device_name

    decode = entry["decode"]
    return common.contention(
        device.type,
        device_name(device),
        windows={f"decode b{b} repetitions": d["step_ms_windows"] for b, d in decode.items()},
        gaps={
            f"trace b{b}": (d["trace"]["gaps_ms"], d["trace"]["step_ms"])
            for b, d in decode.items()
            if "trace" in d
        },
    )


def has_scheme_router(model) -> bool:
    """Whether the model routes over attention schemes (moas_dynamic: it also has a top1 row)."""
    from moa_train.generation import scheme_routed

    return bool(scheme_routed(model))


def bench_model(
    model_name: str, size: DecodeSize, device: torch.device, bandwidth: float, args
) -> dict:
    """{key: entry}: the model's row, plus its top1 row for a router over attention schemes
    (moas_dynamic)."""
    key = f"{size.size}/{model_name}"
    base = {"size": size.size, "model": model_name, "inference_routing": "soft"}
    try:
        model, overrides = build(size, model_name, device)
    except Exception as exc:  # any failure: recorded, not raised
        return {key: {**base, "error": f"build failed: {one_line(exc)}"}}
    base["overrides"] = overrides
    if not model.cached_decoding_ok():
        return {
            key: {
                **base,
                "error": "no KV cache contract (its attention declares no cache): not measured",
            }
        }
    rows = {}
    try:
        with torch.no_grad():
            # rows of 8192 tokens: calibration and measured shares
            tokens = max(16, 8192 // size.prompt_len)
            if routers(model):
                balance_routers(
                    model, prompts(tokens, size.prompt_len, model.vocab_size, device, seed=3)
                )
            if device.type == "cuda":
                model.to(torch.bfloat16)
            base["routing"] = routing_shares(
                model, prompts(tokens, size.prompt_len, model.vocab_size, device, seed=4)
            )
        rows[key] = {
            **base,
            **measure_row(model, model_name, size, device, bandwidth, args, key),
        }
        if has_scheme_router(model):
            from moa_train.generation import set_inference_routing

            set_inference_routing(model, "top1")
            common.release(device)
            label = f"{key}@top1 (inference_routing=top1: one scheme per token)"
            log.info("%s", label)
            rows[f"{key}@top1"] = {
                **base,
                "inference_routing": "top1",
                **measure_row(model, model_name, size, device, bandwidth, args, f"{key}@top1"),
            }
    except Exception as exc:  # any failure, out of memory included: the next model still runs
        failed = f"{key}@top1" if key in rows else key
        rows[failed] = {
            **base,
            "inference_routing": "top1" if key in rows else "soft",
            "error": one_line(exc),
        }
    finally:
        model = None
        common.release(device)
    return rows


# --- the transformers baseline --------------------------------------------------------------------

HF_SETTINGS = {
    # setting -> generate() keywords beyond the common ones
    "dynamic": {"disable_compile": True},  # DynamicCache, eager forward
    # StaticCache; transformers compiles the forward on CUDA itself
    "static": {"cache_implementation": "static"},
}


def hf_llama(size: DecodeSize, kv_heads: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = common.compose_cfg(size.size, "mha", 1, device)[0]
    cfg = LlamaConfig(
        vocab_size=m.data.vocab_size,
        hidden_size=m.model.d_model,
        intermediate_size=4 * m.model.d_model,
        num_hidden_layers=m.model.n_layer,
        num_attention_heads=m.model.n_head,
        num_key_value_heads=kv_heads,
        max_position_embeddings=m.model.max_seq_len,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(cfg)
        .to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        .eval()
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, cfg


def hf_generate(model, idx: torch.Tensor, new_tokens: int, setting: str, clock=None):
    from transformers import LogitsProcessorList

    with torch.no_grad():
        return model.generate(
            input_ids=idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock] if clock else []),
            **HF_SETTINGS[setting],
        )


def step_clock(device: torch.device):
    """A logits processor that notes the time (after a device sync) at each token generate() picks:
    the first after the prefill, then one per decode step. generate() syncs at every step anyway
    (its stopping test), so the extra sync costs next to nothing."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            common.sync(device)
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def hf_row(size: DecodeSize, kv_heads: int, setting: str, device: torch.device) -> dict:
    import transformers

    entry = {
        "size": size.size,
        "model": f"llama-kv{kv_heads}",
        "kv_heads": kv_heads,
        "setting": setting,
        "transformers": transformers.__version__,
        "settings": {
            "attn_implementation": "sdpa",
            "cache": setting,
            "do_sample": False,
            "max_new_tokens": size.new_tokens,
            "min_new_tokens": size.new_tokens,
            "eos_token_id": None,
            **HF_SETTINGS[setting],
        },
    }
    model = None
    try:
        model, cfg = hf_llama(size, kv_heads, device)
        # what transformers took
        entry["settings"]["attn_implementation"] = model.config._attn_implementation
        entry.update(
            {
                "params": sum(p.numel() for p in model.parameters()),
                "dtype": str(model.dtype)[6:],
                "config": {
                    k: getattr(cfg, k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "vocab_size",
                        "tie_word_embeddings",
                    )
                },
                "decode": {},
            }
        )
        for batch in size.batches:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            idx = prompts(batch, size.prompt_len, cfg.vocab_size, device, seed=2)
            t0 = time.perf_counter()
            # warm-up: compilation for these shapes
            out = hf_generate(model, idx, size.new_tokens, setting)
            common.sync(device)
            warmup_s = time.perf_counter() - t0
            if out.shape[1] != size.prompt_len + size.new_tokens:
                raise RuntimeError(
                    f"generate() returned {out.shape[1] - size.prompt_len} new tokens, "
                    f"not {size.new_tokens}"
                )
            clock = step_clock(device)
            common.sync(device)
            t0 = time.perf_counter()
            hf_generate(model, idx, size.new_tokens, setting, clock)
            common.sync(device)
            full = time.perf_counter() - t0
            step_s = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
            entry["decode"][str(batch)] = {
                "batch": batch,
                "generate_s": full,
                "prefill_s": clock.times[0] - t0,
                "warmup_s": round(warmup_s, 1),
                "step_ms": 1000 * step_s,
                "tokens_per_s": batch / step_s,
                "compiled": getattr(model, "_compiled_call", None) is not None,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
            }
            log.info(
                "  transformers kv%d %s batch %d: %.0f tok/s",
                kv_heads,
                setting,
                batch,
                batch / step_s,
            )
    except Exception as exc:  # any failure is a result
        entry["error"] = one_line(exc)
    finally:
        model = None
        common.release(device)
    return entry


def hf_rows(size: DecodeSize, device: torch.device, settings: list):
    """(key, entry) of each transformers row, as measured; one row saying so where transformers is
    missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        yield (
            f"{size.size}/hf",
            {
                "size": size.size,
                "model": "transformers",
                "setting": "-",
                "error": f"transformers not importable here ({one_line(exc)})",
            },
        )
        return
    for kv in size.hf_kv_heads:
        for setting in settings:
            yield f"{size.size}/hf-llama-kv{kv}/{setting}", hf_row(size, kv, setting, device)


# --- fresh processes: moa-generate and transformers, start-up included ---------------------------

# a GPT-2-shaped mha run of one training step (its checkpoint and BPE tokenizer), for moa-generate
CLI_RUN = {
    "gpt2": [
        "model=mha",
        "data=wikitext2_bpe",
        "model.n_layer=12",
        "model.d_model=768",
        "model.n_head=12",
        "model.max_seq_len=1024",
        "trainer.block_size=1024",
    ],
    "tiny": [
        "model=mha",
        "data=wikitext2_bpe",
        "data.vocab_size=512",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=4",
        "model.max_seq_len=64",
        "trainer.block_size=64",
    ],
}
CLI_ONE_STEP = [
    "trainer.batch_size=1",
    "trainer.max_steps=1",
    "trainer.eval_interval=1000000",
    "trainer.eval_iters=1",
    "trainer.compile=false",
    "trainer.cuda_graphs=false",
    "trainer.precision=fp32",
]

# transformers' side: a user's script (from_pretrained, then generate() with the static cache, which
# transformers compiles on CUDA); it prints a line at the first new token (the streamer's second
# put: the first is the prompt)
HF_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
path, n, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
ids = torch.load(path + "/prompt.pt").to(device)

class First:
    puts = 0
    def put(self, value):
        First.puts += 1
        if First.puts == 2:
            print("first", flush=True)
    def end(self):
        pass

with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, streamer=First(),
                         cache_implementation="static")
print("new", out.shape[1] - ids.shape[1], flush=True)
"""


def timed_process(cmd: list, env: dict, timeout: float = 540) -> dict:
    """{ttft_s, wall_s}: a child's wall time and the time to its first byte of output (the first
    token: moa-generate prints the prompt with it, the HF child a line), from its start."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not first:
        lines = err.decode(errors="replace").strip().splitlines() or ["no output"]
        return {"error": f"exit {proc.returncode}: {lines[-1][:200]}"}
    return {"ttft_s": ttft, "wall_s": wall, "stdout": (first + rest).decode(errors="replace")}


def cli_row(size: DecodeSize, device: torch.device, work: Path) -> dict:
    """moa-generate (compiled and eager) and transformers' compiled static cache, each timed as a
    fresh process on the same shape (a GPT-2-shaped mha run of BPE vocabulary, batch 1)."""
    import os
    import subprocess

    from moa_train.api import load_tokenizer

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = work / "cli_run"
    train = [sys.executable, "-m", "moa_train", *CLI_RUN[size.size], *CLI_ONE_STEP]
    train += [f"trainer.device={device.type}", f"hydra.run.dir={run}"]
    done = subprocess.run(train, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": f"the run for moa-generate failed: {done.stderr.strip()[-300:]}"}
    tokenizer = load_tokenizer(run)
    text, words = "", (work / "cli_words.txt")
    # the prompt: the valid text of the corpus the run above read, found as the run found it
    from moa_train.config import compose_train
    from moa_train.data.corpora import lm_corpus
    from moa_train.data.corpus import DataError, expand
    from moa_train.data.text_corpus import locate

    data = compose_train(CLI_RUN[size.size]).data
    try:
        files = locate(data, lm_corpus(data.name), expand(data.cache_dir), fetch=False)
    except DataError as exc:
        return {"error": f"the prompt (WikiText-2's valid text): {exc}"}
    if files is None:
        return {"error": "the prompt (WikiText-2's valid text): no data folder and no download"}
    source = files["val"].read_text(encoding="utf-8").split()
    for w in source:  # the longest prefix of the valid text within prompt_len tokens
        if len(tokenizer.encode(text + w + " ")) > size.prompt_len:
            break
        text += w + " "
    words.write_text(text.strip() + "\n", encoding="utf-8")
    n_prompt = len(tokenizer.encode(text.strip()))
    gen = [sys.executable, "-m", "moa_train.generation", str(run), "--prompt-file", str(words)]
    gen += ["--max-new-tokens", str(size.new_tokens), "--greedy", "--device", device.type]
    # each twice: the second process finds torch's on-disk compile caches (inductor's FX graph
    # cache, under /tmp/torchinductor_<user>) that the first filled
    commands = {}
    for flag in ("--compile", "--no-compile"):
        for rep in ("first", "second"):
            commands[f"moa-generate {flag} ({rep} process)"] = timed_process([*gen, flag], env)
    # transformers: the same shape, random weights saved as a user's model folder
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        m = common.compose_cfg(size.size, "mha", 1, device)[0].model
        hf_cfg = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=m.d_model,
            intermediate_size=4 * m.d_model,
            num_hidden_layers=m.n_layer,
            num_attention_heads=m.n_head,
            num_key_value_heads=m.n_head,
            max_position_embeddings=m.max_seq_len,
            tie_word_embeddings=True,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=0,
        )
        folder = work / "hf_llama"
        torch.manual_seed(0)
        LlamaForCausalLM(hf_cfg).save_pretrained(folder)
        torch.save(torch.randint(0, tokenizer.vocab_size, (1, n_prompt)), folder / "prompt.pt")
        hf = [sys.executable, "-c", HF_CHILD, str(folder), str(size.new_tokens), device.type]
        for rep in ("first", "second"):
            name = f"transformers generate(), static cache ({rep} process)"
            commands[name] = timed_process(hf, env)
    except ImportError as exc:
        commands["transformers generate(), static cache"] = {"error": one_line(exc)}
    for c in commands.values():
        out = c.pop("stdout", "")
        if "error" not in c:
            c["tokens_per_s"] = (size.new_tokens - 1) / (c["wall_s"] - c["ttft_s"])
            c["output_chars"] = len(out)
    return {
        "prompt_tokens": n_prompt,
        "new_tokens": size.new_tokens,
        "vocab_size": tokenizer.vocab_size,
        "what": (
            f"moa-generate on a {size.size}-shaped mha run (BPE {tokenizer.vocab_size}, one "
            "training step); transformers' LlamaForCausalLM of the same size and vocabulary from "
            "a saved folder."
        ),
        "commands": commands,
    }


# --- results --------------------------------------------------------------------------------------


def hf_baseline(
    results: dict, size: str, kv_heads: int, batch: str, device: str | None = None, runs=None
) -> tuple:
    """(tokens/s, row name) of the transformers row a model's decode compares with: measured on the
    same card (`device`: the runs' device names), same K/V heads where there is one, else the
    mha-equivalent (the first, n_head K/V heads); of its settings the faster (what a user would
    pick)."""
    rows = [
        r
        for r in results.values()
        if r["size"] == size
        and r.get("setting") in HF_SETTINGS
        and batch in r.get("decode", {})
        and (device is None or (runs or {}).get(r.get("run"), {}).get("device") == device)
    ]
    if not rows:
        return None, None
    heads = kv_heads if any(r["kv_heads"] == kv_heads for r in rows) else SIZES[size].hf_kv_heads[0]
    rows = [r for r in rows if r["kv_heads"] == heads]
    r = max(rows, key=lambda r: r["decode"][batch]["tokens_per_s"])
    return r["decode"][batch]["tokens_per_s"], f"{r['model']} {r['setting']}"


def model_rows(results: dict, size: str) -> list:
    order = list(bench_presets())
    rows = [
        r
        for r in results.values()
        if r["size"] == size and "setting" not in r and r.get("model") != "cli"
    ]
    return sorted(
        rows,
        key=lambda r: (
            order.index(r["model"]) if r["model"] in order else len(order),
            r["model"],
            r.get("inference_routing") or "",
        ),
    )


def row_name(r: dict) -> str:
    return r["model"] + ("@top1" if r.get("inference_routing") == "top1" else "")


def targets(results: dict) -> list:
    """(target, measured, met, short by) rows for the GPT-2 size, from whatever the results hold."""
    out = []
    for models, index, floor in TARGETS:
        for model in models:
            r = results.get(f"gpt2/{model}")
            if r and "error" in r:
                out.append(
                    (
                        f"{model}: >= {floor:.0%} of the bandwidth bound",
                        "not measured",
                        False,
                        r["error"],
                    )
                )
            if not r or "decode" not in r:
                continue
            batch = str(SIZES["gpt2"].batches[index])
            share = r["decode"][batch]["share_of_bound"]
            out.append(
                (
                    f"{model} batch {batch}: >= {floor:.0%} of the bandwidth bound",
                    f"{share:.1%}",
                    share >= floor,
                    None
                    if share >= floor
                    else f"{floor - share:.1%} of the bound ({floor / share:.1f}x too slow)",
                )
            )
    for _key, r in sorted(results.items()):
        if r["size"] == "gpt2" and "kv_bytes_per_token" in r and "setting" not in r:
            ok = r["kv_bytes_per_token_measured"] == r["kv_bytes_per_token"]
            out.append(
                (
                    f"{row_name(r)}: measured KV bytes/token = analytic",
                    f"{r['kv_bytes_per_token_measured']:g} vs {r['kv_bytes_per_token']}",
                    ok,
                    None if ok else "a mismatch: a bug to explain",
                )
            )
    return out


def routing_cell(routing: dict | None) -> str:
    if not routing:
        return "-"
    shares = "/".join(f"{s:.2f}" for s in routing["share"])
    return f"{shares} (worst layer +-{routing['worst_dev']:.2f})"


def span_note(d: dict) -> str:
    """How much of the cache a row's decode steps attended over (rows measured before spans existed:
    all of it)."""
    bucket = d.get("span_bucket", 0)
    return ", attends over the whole cache" if not bucket else f", attends over spans of {bucket}"


def model_cells(r: dict, results: dict, size: str, runs: dict | None, lo: str, hi: str) -> list:
    """A model's cells in a size's main table (its error, where it was not measured)."""
    if "error" in r:
        return [row_name(r), f"**not measured**: {r['error']}", *["-"] * 12, r.get("run")]
    d = r["decode"]
    mode = {b: d[b]["mode"] + span_note(d[b]) for b in (lo, hi)}
    ratios = []
    for b in (lo, hi):
        card = (runs or {}).get(r.get("run"), {}).get("device")
        base, name = hf_baseline(results, size, r["kv_heads"], b, card, runs)
        ratios.append(f"{d[b]['tokens_per_s'] / base:.2f} ({name})" if base else "-")
    return [
        row_name(r) + common.mark(r.get("contention")),
        mode[lo] if mode[lo] == mode[hi] else f"{mode[lo]} / {mode[hi]}",
        f"{r['prefill']['tokens_per_s']:,.0f}",
        f"{d[lo]['tokens_per_s']:,.0f}",
        f"{d[hi]['tokens_per_s']:,.0f}",
        *ratios,
        f"{r['kv_bytes_per_token']:,.0f}",
        f"{r['kv_bytes_per_token_measured']:,.0f}",
        common.fmt(r.get("kv_bytes_per_token_realised"), ",.0f"),
        common.fmt(d[hi]["peak_mem_gib"], ".2f"),
        f"{d[lo]['share_of_bound']:.1%}",
        f"{d[hi]['share_of_bound']:.1%}",
        routing_cell(r.get("routing")),
        r["run"],
    ]


def hf_cells(r: dict, lo: str, hi: str) -> list:
    """A transformers baseline's cells (its error, where it failed before measuring)."""
    d = r.get("decode", {})
    if "error" in r and not d:
        return [
            *(r["model"], r.get("kv_heads", "-"), r["setting"], "-", f"**failed**: {r['error']}"),
            *["-"] * 4,
            *(r.get("transformers", "-"), r.get("run")),
        ]
    err = f" (then failed: {r['error']})" if "error" in r else ""
    return [
        r["model"] + common.mark(r.get("contention")),
        r["kv_heads"],
        r["setting"] + err,
        "/".join("yes" if d[b]["compiled"] else "no" for b in (lo, hi) if b in d),
        *(common.fmt(d[b]["tokens_per_s"], ",.0f") if b in d else "-" for b in (lo, hi)),
        *(common.fmt(d[b]["generate_s"], ".2f") if b in d else "-" for b in (lo, hi)),
        common.fmt(d[hi]["peak_mem_gib"] if hi in d else None, ".2f"),
        r["transformers"],
        r["run"],
    ]


def path_cells(r: dict, lo: str, hi: str) -> list:
    """A model's generate() and eager decode rates beside the benchmark's, then its run."""
    cells = []
    for b in (lo, hi):
        bench, gen = r["decode"][b]["tokens_per_s"], r["generate"][b]["tokens_per_s"]
        eager = r.get("decode_eager", {}).get(b, {}).get("tokens_per_s")
        cells += [f"{bench:,.0f}", f"{gen:,.0f}", f"{gen / bench:.2f}", common.fmt(eager, ",.0f")]
    return [*cells, r["run"]]


def size_tables(results: dict, size: str, runs: dict | None = None) -> list:
    rows = model_rows(results, size)
    hf = [r for r in results.values() if r["size"] == size and "setting" in r]
    cli = [r for r in results.values() if r["size"] == size and r.get("model") == "cli"]
    if not rows and not hf and not cli:
        return []
    s = SIZES[size]
    lo, hi = (str(b) for b in s.batches)
    out = [
        "",
        f"## Size {size}",
        "",
        (
            f"Decode at batch {lo} and {hi}, prefill at batch {s.prefill_batch}; prompt and new "
            "tokens per run in the runs table. Peak memory: prefill + decode at that batch, "
            "weights included."
        ),
        "",
    ]
    if rows:
        header = [
            *("model", f"decode mode (b{lo} / b{hi})", "prefill tok/s"),
            *(f"decode tok/s b{lo}", f"decode tok/s b{hi}"),
            *(f"x transformers b{lo}", f"x transformers b{hi}"),
            *("KV B/token analytic", "measured", "realised", f"peak mem GiB b{hi}"),
            *(f"bound share b{lo}", f"bound share b{hi}", "routing shares", "run"),
        ]
        cells = [model_cells(r, results, size, runs, lo, hi) for r in rows]
        out += table_lines(header, cells)
    if hf:
        out += [
            "",
            (
                "Transformers baseline (LlamaForCausalLM, random init; decode tok/s = batch / the "
                "mean time between consecutive tokens of one generate(), timed by a logits "
                "processor):"
            ),
            "",
            *table_lines(
                [
                    *("model", "K/V heads", "setting", "compiled"),
                    *(f"decode tok/s b{lo}", f"decode tok/s b{hi}"),
                    *(f"generate s b{lo}", f"generate s b{hi}", f"peak mem GiB b{hi}"),
                    *("transformers", "run"),
                ],
                [
                    hf_cells(r, lo, hi)
                    for r in sorted(hf, key=lambda r: (-r.get("kv_heads", 0), r["setting"]))
                ],
            ),
        ]
    out += common.contention_notes(
        (
            f"{size}/{row_name(r)}" if "setting" not in r else f"{r['model']} {r['setting']}",
            r.get("contention"),
        )
        for r in rows + hf
    )
    paths = [r for r in rows if r.get("generate")]
    if paths:
        out += [
            "",
            (
                "The paths users run, in the same run: decode tok/s of `generate()` itself "
                "(moa_train.generation, greedy, compiled as the row's mode says; from the first "
                "token drawn to the ids on the host) and of eager decode steps (the same steps, "
                "not compiled), beside the benchmark's figure above:"
            ),
            "",
        ]
        header = ["model"]
        for b in (lo, hi):
            header += [f"bench b{b}", f"generate() b{b}", f"generate / bench b{b}", f"eager b{b}"]
        out += table_lines([*header, "run"], [[row_name(r), *path_cells(r, lo, hi)] for r in paths])
    for r in cli:
        if "error" in r:
            out += ["", f"Fresh processes (`--cli`): **failed** in run {r['run']}: {r['error']}"]
            continue
        out += [
            "",
            (
                f"Fresh processes, batch 1, a {r['prompt_tokens']}-token prompt + "
                f"{r['new_tokens']} new tokens, greedy, bf16 on CUDA, each a new Python process "
                "(start-up, loading and compilation included; time to first token from the "
                f"process start; tok/s over the new tokens after the first): {r['what']}"
            ),
            "",
            *table_lines(
                ["command", "time to first token s", "wall s", "tok/s after the first", "run"],
                [
                    [name, f"**failed**: {c['error']}", "-", "-", r["run"]]
                    if "error" in c
                    else [name, f"{c['ttft_s']:.2f}", f"{c['wall_s']:.2f}"]
                    + [common.fmt(c.get("tokens_per_s"), ",.0f"), r["run"]]
                    for name, c in r["commands"].items()
                ],
            ),
        ]
    traces = [
        (r, b, r["decode"][b]["trace"])
        for r in rows
        if "decode" in r
        for b in (lo, hi)
        if "trace" in r["decode"][b]
    ]
    for r, b, t in traces:
        out += [
            "",
            f"Trace of one decode step, {row_name(r)} batch {b} ({t['of']}): {t['kernel_ms']:.3f} "
            f"ms in {t['n_kernels']} kernels of a {t['step_ms']:.3f} ms step: gaps "
            f"{t['gaps_ms']:.3f} ms ({max(t['gaps_ms'], 0) / t['step_ms']:.0%}); bound "
            f"{r['decode'][b]['bound_ms']:.3f} ms."
            + (f" Note: {t['note']}." if t.get("note") else ""),
            "",
        ]
        out += [f"- {k['ms']:.3f} ms x{k['calls']}: `{k['kernel']}`" for k in t["top"]]
    return out


RUNS_HEADER = (
    "transformers",
    "commit",
    "copy bandwidth GB/s",
    "size",
    "prompt + new tokens",
)


def run_cells(run: dict) -> list:
    return [
        run["transformers"] or "-",
        run.get("git_sha") or "-",
        f"{run['bandwidth'] / 1e9:,.1f}",
        run["size"],
        f"{run['prompt_len']} + {run['new_tokens']}",
    ]


def markdown(data: dict, notes: bool = False) -> str:
    """inference.md from inference.json; notes: a hand-written inference_notes.md lies beside
    (linked under the targets, as the place that says why a target is missed)."""
    out = [
        "# moa-bench --decode: what each attention variant costs to serve",
        "",
        (
            "Written by `moa-bench --decode` (moa_train/bench/decode.py) from inference.json; each "
            "row names the run that measured it. Bound = bytes one decode step must read (every "
            "parameter once + the batch's K/V at the mean context length, prompt + new / 2) / the "
            "copy bandwidth measured at the start of the same run (a device-to-device copy, read + "
            "write bytes); bound share = bound time / measured step time. A decode step attends "
            "over its position + 1 rounded up to a multiple of the span bucket (`--span-bucket`, "
            "one CUDA graph per span; the decode mode column says which), or over the cache's "
            "whole max_len, so it reads somewhat more K/V than the bound counts; routed rows (moa "
            "k < E, top1) read fewer weights than it counts. Routed models are set to balanced "
            "routing (router weights whitened and mean-free over random-token inputs); `routing "
            "shares` are the realised shares per choice (of top-k assignments, or of each token's "
            "argmax for a soft router), averaged over layers, and the worst layer's largest "
            "distance from uniform."
        ),
        "",
    ]
    out += common.runs_section(data["runs"], RUNS_HEADER, run_cells)
    results = data["results"]
    rows = targets(results)
    if rows:
        out += [
            "",
            "## Targets (GPT-2 small)",
            "",
            *table_lines(
                ["target", "measured", "met", "short by"],
                [[t, m, "yes" if ok else "**no**", by or "-"] for t, m, ok, by in rows],
            ),
        ]
        if notes:
            out += [
                "",
                (
                    "Why each missed target is missed, from the traces below: [inference_notes.md]"
                    "(inference_notes.md) (hand-written)."
                ),
            ]
    for size in SIZES:
        out += size_tables(results, size, data["runs"])
    return "\n".join(out) + "\n"


def bar_label(data: dict, r: dict) -> str:
    """A row's name in the figure with its card and run: rows of several runs and cards share the
    figure (transformers' rows of each run are kept), and their bars must say which they are."""
    name = f"HF {r['model']} {r['setting']}" if "setting" in r else row_name(r)
    device = data.get("runs", {}).get(r.get("run"), {}).get("device", "?")
    card = next((w for w in device.split() if w != "NVIDIA"), "?")
    return f"{name} ({card}, {r.get('run', '?')[:16]})"


def figure(data: dict, path: Path) -> None:
    """Decode tokens/s at both batches per variant beside the transformers rows, and KV bytes per
    token."""
    import numpy as np

    from moa_train.metrics.plots import pyplot

    results = data["results"]
    size = next(
        (s for s in ("gpt2", "tiny") if any(r["size"] == s for r in results.values())), None
    )
    if size is None:
        return
    lo, hi = (str(b) for b in SIZES[size].batches)
    rows = [(bar_label(data, r), r) for r in model_rows(results, size) if "decode" in r]
    rows += [
        (bar_label(data, r), r)
        for r in results.values()
        if r["size"] == size and "setting" in r and lo in r.get("decode", {}) and hi in r["decode"]
    ]
    plt = pyplot()
    fig, (ax, ax_kv) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    for off, b, color in ((-0.2, lo, "tab:blue"), (0.2, hi, "tab:orange")):
        ax.bar(
            x + off,
            [r["decode"][b]["tokens_per_s"] for _, r in rows],
            0.4,
            label=f"batch {b}",
            color=color,
        )
    ax.set_yscale("log")
    ax.set_xticks(x, [n for n, _ in rows], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="decode tokens/s (log)", title=f"Decode throughput, size {size}")
    ax.legend(fontsize=8)
    kv = [(row_name(r), r) for r in model_rows(results, size) if "kv_bytes_per_token" in r]
    xk = np.arange(len(kv))
    ax_kv.bar(
        xk,
        [r["kv_bytes_per_token"] / 1024 for _, r in kv],
        0.6,
        color="tab:green",
        label="analytic",
    )
    ax_kv.plot(
        xk,
        [r["kv_bytes_per_token_measured"] / 1024 for _, r in kv],
        "k_",
        markersize=18,
        label="measured",
    )
    # realised: the tokens' stored heads (below the allocation only where tokens choose, moas_kv's
    # pool)
    ax_kv.plot(
        xk,
        [r.get("kv_bytes_per_token_realised", np.nan) / 1024 for _, r in kv],
        "o",
        color="tab:red",
        markersize=5,
        label="realised (stored heads)",
    )
    ax_kv.set_xticks(xk, [n for n, _ in kv], rotation=35, ha="right", fontsize=8)
    ax_kv.set(ylabel="KV cache KiB per token", title="KV cache per token (all layers)")
    ax_kv.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(data, indent=1))
    (out / "inference.md").write_text(markdown(data, (out / "inference_notes.md").is_file()))
    figure(data, out / "inference.png")


# --- entry point ----------------------------------------------------------------------------------


def parse_args(argv):
    models = bench_presets()
    p = Parser(prog="moa-bench --decode", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(models), help=f"comma-separated, of: {', '.join(models)}"
    )
    p.add_argument(
        "--decode-size", default="gpt2", choices=list(SIZES), help="model size (default gpt2)"
    )
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default: gpt2 512, tiny 16)")
    p.add_argument(
        "--new-tokens", type=int, help="tokens generated per row (default: gpt2 256, tiny 8)"
    )
    p.add_argument(
        "--no-hf", dest="hf", action="store_false", help="skip the transformers baseline"
    )
    p.add_argument("--hf-only", action="store_true", help="the transformers baseline only")
    p.add_argument(
        "--hf-settings", default=",".join(HF_SETTINGS), help=f"of: {', '.join(HF_SETTINGS)}"
    )
    p.add_argument(
        "--no-trace",
        dest="trace",
        action="store_false",
        help="no profiler trace where a target is missed",
    )
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="eager decode step (CUDA graph kept)",
    )
    p.add_argument(
        "--span-bucket",
        type=int,
        default=0,
        help="each step attends over its position + 1 rounded up to a multiple of this (one "
        "compile and "
        "CUDA graph per span); 0: over the whole cache (default)",
    )
    p.add_argument(
        "--no-paths",
        dest="paths",
        action="store_false",
        help="skip the rows of generate()'s own path and of eager decoding",
    )
    p.add_argument(
        "--cli",
        action="store_true",
        help="also time moa-generate (compiled and eager) and transformers' compiled static cache "
        "as fresh processes on a GPT-2-shaped mha run, start-up included",
    )
    common.add_out_args(p, "inference.json / .md / .png")
    p.add_argument(
        "--tables-only", action="store_true", help="rebuild inference.md and .png from the json"
    )
    args = p.parse_args(argv)
    bad = [n for n in args.models.split(",") if n not in models]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)}; allowed: {', '.join(models)}")
    bad = [n for n in args.hf_settings.split(",") if n not in HF_SETTINGS]
    if bad:
        p.error(f"--hf-settings: unknown {', '.join(bad)}; allowed: {', '.join(HF_SETTINGS)}")
    size = SIZES[args.decode_size]
    if args.span_bucket < 0:
        p.error(
            "--span-bucket: must be 0 (the whole cache) or a positive integer, got "
            f"{args.span_bucket}"
        )
    for flag, value in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens)):
        if value is not None and value < 1:
            p.error(f"{flag}: must be a positive integer, got {value}")
    args.size = DecodeSize(
        size.size,
        args.prompt_len or size.prompt_len,
        args.new_tokens or size.new_tokens,
        size.prefill_batch,
        size.batches,
        size.hf_kv_heads,
        size.copy_bytes,
    )

    limit = int(
        next(o for o in MODEL_SIZES[size.size][0] if o.startswith("model.max_seq_len=")).split("=")[
            1
        ]
    )
    if args.size.new_tokens < 2:
        p.error(f"--new-tokens: at least 2 (one decode step), got {args.size.new_tokens}")
    if args.size.prompt_len + args.size.new_tokens > limit:
        p.error(
            f"--prompt-len + --new-tokens: {args.size.prompt_len + args.size.new_tokens} exceeds "
            f"the size's model.max_seq_len={limit}"
        )
    return args


def main(argv=None) -> int:
    argv, args, out, data = common.begin(argv, parse_args, "inference.json", save)
    if args.tables_only:
        return 0
    from moa_train.metrics.flops import device_name
    from moa_train.train.loop import git_sha

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_id = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    nbytes = args.size.copy_bytes if device.type == "cuda" else None
    bandwidth, run_contention = common.probe(device, nbytes=nbytes)
    log.info("copy bandwidth: %.0f GB/s (read + write)", bandwidth / 1e9)
    common.warn(f"run {run_id}", run_contention)
    data["runs"][run_id] = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": hf_version,
        "git_sha": git_sha(),
        "command": shlex.join(["moa-bench", "--decode", *argv]),
        "bandwidth": bandwidth,
        "size": args.size.size,
        "prompt_len": args.size.prompt_len,
        "new_tokens": args.size.new_tokens,
        "contention": run_contention,
    }
    save(data, out)

    def record(key: str, entry: dict, probed: dict) -> None:
        """A row into the results, flagged with the run's, its probe's and its own signals."""
        entry = {**entry, "run": run_id}
        entry["contention"] = common.merge(run_contention, probed, entry.get("contention"))
        common.warn(key, entry["contention"])
        data["results"][key] = entry

    if not args.hf_only:
        for name in args.models.split(","):
            log.info("%s/%s", args.size.size, name)
            rows = bench_model(name, args.size, device, bandwidth, args)
            # a probe after each model (its memory released): a machine busy while the model was
            # measured is likely still busy now
            probed = common.probe(device, first=bandwidth, nbytes=nbytes)[1]
            for key, entry in rows.items():
                record(key, entry, probed)
                if "error" in entry:
                    log.warning("%s: %s", key, entry["error"])
            save(data, out)  # after every model, so a run cut short keeps what it measured
    if args.hf:
        for key, entry in hf_rows(args.size, device, args.hf_settings.split(",")):
            record(key, entry, common.probe(device, first=bandwidth, nbytes=nbytes)[1])
            save(data, out)
    if args.cli:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            entry = cli_row(args.size, device, Path(work))
        if "error" in entry:
            log.warning("cli: %s", entry["error"])
        record(f"{args.size.size}/cli", {"size": args.size.size, "model": "cli", **entry}, None)
        save(data, out)
    common.warn_flagged(data["results"], run_id)
    log.info("results: %s", out / "inference.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
