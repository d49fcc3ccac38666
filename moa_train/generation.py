"""Text from a trained decoder-only LM: `generate` (the Python API) and `moa-generate RUN_DIR` (the
command line).

Prompts are batched right-padded with per-row lengths: one prefill, then one token per row per step
through the model's KV cache (`init_cache` / `prefill` / `decode_step`); `use_cache=False`
(`--no-cache`) recomputes a full forward over each row every step instead, with the same results.
Sampling: temperature, top-k, top-p (nucleus) or greedy, after an optional repetition penalty
(transformers' semantics), drawn from a torch.Generator on the model's device, so a seed reproduces
a sample. `num_samples` completions per prompt run as rows of one batch.

Prompts: a str is one prompt (a str comes back), a list is a batch (a list comes back). An empty
prompt generates from nothing: these tokenizers have no BOS token, so it starts after a line end
(`start_ids`), the token that precedes every line of the training text.

Lengths: with the sliding window off (the default), a prompt longer than model.max_seq_len is
refused (one line) and a row stops early when its next token would need a position past
model.max_seq_len (the model has no embedding for it), so its completion may be shorter than
max_new_tokens. With `window=True` (`--window`), as nanoGPT's sample: a longer prompt keeps its last
max_seq_len tokens, and past the limit each token is drawn from a full forward over the row's last
max_seq_len tokens (models/decoding.Windowed).

Stop strings end a row at their first occurrence in its completion, which is cut before it; when
every row has stopped, generation ends.

The tokenizer must be the one the model was trained with: a checkpoint records it (the sha256 of
tokenizer.json and its vocabulary size) and another is refused (one line naming both files); a
checkpoint from before that is checked by vocabulary size only, with a note.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from moa_train.errors import Parser, fail
from moa_train.models.decoding import Windowed, decode_loop, open_steps, release_compiled
from moa_train.models.kv_cache import without_cudnn_attention
from moa_train.models.roles import ROUTER, declared_modules

UNK = "<unk>"
# compiled steps are kept per cache length: lengths are rounded up to multiples of this
COMPILE_LEN_ROUND = 128
# compile=None (auto): on CUDA, a model compiles once the decode steps it has run eagerly in this
# process, with those of the call at hand, reach this many. Measured on an H100 (GPT-2 small, bf16,
# docs/results/inference.md): compiling and capturing one shape took 7-14 s, and a compiled step
# saved about 5 ms against an eager one at batch 1 and 64 alike, so compiling pays after about
# 2,000 steps; the compiled steps are then kept on the model for every later call of that shape.
COMPILE_AFTER_STEPS = 2048
# a lower temperature acts as this one, float32's smallest normal number: pick divides logits
# shifted to a maximum of 0 (no overflow), and here a token 1e-36 below the maximum already gets a
# probability under 1e-36 (greedy, ties shared); a smaller divisor may round to 0 (0 / 0 = nan)
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def scheme_routed(model) -> list:
    """The modules of `model` with a router (declared with role ROUTER) whose inference routing
    moa-generate can choose (INFERENCE_ROUTINGS): the attentions of a moas_dynamic model."""
    return [
        m
        for m in model.modules()
        if getattr(m, "INFERENCE_ROUTINGS", ()) and declared_modules(m, ROUTER)
    ]


def set_inference_routing(model, mode: str) -> None:
    """model.inference_routing of a trained moas_dynamic model, chosen at generation time: soft (as
    trained) or top1 (each token's argmax branch; see MoASAttention.through_cache). ValueError (one
    line) for a model without a router over attention schemes."""
    if mode not in ("soft", "top1"):
        raise ValueError(f"inference routing {mode!r}: valid: soft, top1")
    routed = scheme_routed(model)
    if not routed:
        raise ValueError(
            f"inference routing {mode}: this run's attention ({model.config.name}) has no router "
            "over attention schemes; it applies to moas_dynamic runs"
        )
    for module in routed:
        module.inference_routing = mode
    # compiled steps kept on the model hold graphs of the old routing
    release_compiled(model)


def pick(
    logits: torch.Tensor, temperature: float, top_k, top_p, greedy: bool, generator
) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits. top_k None or 0, top_p None or 1: off."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float()
    # at most 0 before the division, so no temperature overflows them to inf (nan in the softmax)
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already hold top_p of the mass (the most likely
        # always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty (RepetitionPenaltyLogitsProcessor): the logits (B, V) of
    tokens already in a row (`seen`, (B, V) bool: its prompt and completion so far) divided by
    `penalty` where positive, multiplied by it where not; > 1 discourages repeats."""
    logits = logits.float()
    hit = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, hit, logits)


def check_settings(
    max_new_tokens: int,
    temperature: float,
    top_k,
    top_p,
    greedy: bool,
    num_samples: int = 1,
    repetition_penalty: float = 1.0,
) -> None:
    """ValueError (one line, starting with the setting's name) for a setting out of range."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}) unless greedy")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, 0 for off (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    if greedy and num_samples > 1:
        raise ValueError(
            f"num_samples={num_samples} needs sampling: greedy decoding gives one completion"
        )
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, 1 for off (got {repetition_penalty})")


def check_stops(stop) -> tuple:
    """The stop strings as a tuple: None (none), a str or a list of str, none of them empty."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str (got {s!r})")
    return stops


def trim(text: str, stops: tuple) -> str:
    """`text` cut before the first occurrence of any stop string."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def pending(text: str, stops: tuple) -> int:
    """How many characters at the end of `text` may begin a stop string (held back when
    streaming)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def as_prompts(prompts) -> tuple:
    """(the prompts as a list of str, whether one str was given)."""
    if isinstance(prompts, str):
        return [prompts], True
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        return list(prompts), False
    kind = type(prompts).__name__
    if isinstance(prompts, (list, tuple)):
        kind += " holding " + ", ".join(sorted({type(p).__name__ for p in prompts}))
    raise ValueError(f"prompts must be a str (one prompt) or a list of str (got a {kind})")


def check_tokenizer(model, tokenizer, warn=None) -> None:
    """ValueError (one line, naming the tokenizer's file and the checkpoint) for a tokenizer the
    model was not trained with: where the model's checkpoint records one (model.tokenizer_identity,
    set by load_checkpoint_model), the sha256 of its tokenizer.json (tokenizer.identity, set by
    load_tokenizer) and its vocabulary size must match; otherwise (a checkpoint from before they
    were recorded, a model built in code) its vocabulary size must be the model's (or fit in it,
    where the config set model.vocab_size), and `warn` is told that a checkpoint's tokenizer could
    not be verified."""
    source = getattr(tokenizer, "source", f"the {tokenizer.kind} tokenizer")
    checkpoint = getattr(model, "checkpoint_path", None)
    recorded = getattr(model, "tokenizer_identity", None)
    n = tokenizer.vocab_size
    if recorded is not None:
        own = getattr(tokenizer, "identity", None) or {"sha256": None, "vocab_size": n}
        if n != recorded["vocab_size"] or own["sha256"] not in (None, recorded["sha256"]):
            sha = f"sha256 {own['sha256'][:12]}, " if own["sha256"] else ""
            raise ValueError(
                f"{source} is not the tokenizer {checkpoint or 'the model'} was trained with "
                f"({sha}{n} symbols; the checkpoint records sha256 {recorded['sha256'][:12]}, "
                f"{recorded['vocab_size']} symbols): use the tokenizer.json of the run that wrote "
                "the checkpoint"
            )
        return
    padded = getattr(model.config, "vocab_size", None) is not None
    if n > model.vocab_size or (n != model.vocab_size and not padded):
        raise ValueError(
            f"{source} holds {n} symbols but {checkpoint or 'the model'} has "
            f"{model.vocab_size} (model.vocab_size): not the tokenizer the model was trained with"
        )
    if checkpoint is not None and warn is not None:
        warn(
            f"{checkpoint} records no tokenizer (written before checkpoints did): {source} matches "
            "its vocabulary size, but that it is the tokenizer the model was trained with could "
            "not be verified"
        )


def start_ids(tokenizer) -> list:
    """The context an empty prompt generates from. These tokenizers have no BOS token; a line end
    (char '\\n', word <eos>, byte-level BPE's newline) precedes every line of the training text, so
    generating from nothing starts after one, as GPT-2 starts from <|endoftext|>. ValueError (one
    line) for a vocabulary without it."""
    if tokenizer.unknown("\n"):
        raise ValueError(
            f"an empty prompt starts after a line end, which the run's {tokenizer.kind} "
            "vocabulary lacks: give a prompt"
        )
    return [int(i) for i in tokenizer.encode("\n")]


def encode_prompt(tokenizer, text: str, max_seq_len: int, warn=None, window: bool = False) -> list:
    """The prompt's ids; an empty one (or one of no tokens: white space in a word vocabulary)
    starts from `start_ids`. Text that is not UTF-8 (lone surrogates: the bytes Python could not
    decode) is refused. Symbols outside a vocabulary without <unk> (char, unless trained with
    data.unk) are refused, naming them; with <unk> (word; char with data.unk) they map to it and
    `warn(message)` is told. A prompt longer than max_seq_len
    is refused, or with `window` cut to its last max_seq_len tokens (`warn` is told)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"prompt {text[:40]!r}: character {exc.start} ({text[exc.start]!r}, an undecodable "
            "byte) is not text: a prompt must be valid UTF-8"
        ) from None
    unknown = tokenizer.unknown(text)
    if unknown:
        names = ", ".join(map(repr, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        if getattr(tokenizer, "unk_id", None) is None:
            raise ValueError(
                f"prompt {text[:40]!r}: {names} not in the run's {tokenizer.kind} vocabulary, "
                f"which has no {UNK}"
            )
        if warn is not None:
            warn(
                f"prompt {text[:40]!r}: {names} not in the run's {tokenizer.kind} vocabulary: "
                f"mapped to {UNK}"
            )
    ids = [int(i) for i in tokenizer.encode(text)] or start_ids(tokenizer)
    if len(ids) <= max_seq_len:
        return ids
    if not window:
        raise ValueError(
            f"prompt {text[:40]!r} is {len(ids)} tokens, longer than "
            f"model.max_seq_len={max_seq_len} (a sliding window, window=True or --window, keeps "
            "its last tokens)"
        )
    if warn is not None:
        warn(
            f"prompt {text[:40]!r} is {len(ids)} tokens: the sliding window keeps its last "
            f"{max_seq_len} (model.max_seq_len)"
        )
    return ids[-max_seq_len:]


class _Streamer:
    """Hands each new piece of a completion to `callback`, holding back a piece that ends inside a
    UTF-8 character (byte-level BPE) or may begin a stop string, and nothing past a stop string."""

    def __init__(self, tokenizer, callback, stops: tuple = ()):
        self.tokenizer, self.callback, self.stops, self.sent = tokenizer, callback, stops, 0

    def __call__(self, ids: list, final: bool = False) -> None:
        text = self.tokenizer.decode(ids)
        shown = trim(text, self.stops)
        if len(shown) == len(text) and not final:  # no stop string yet
            if text.endswith("\ufffd"):
                return
            shown = text[: len(text) - pending(text, self.stops)]
        if len(shown) > self.sent:
            self.callback(shown[self.sent :])
            self.sent = len(shown)


class _Watch:
    """`on_token` of decode_loop where stop strings or streaming need each row's new ids on the host
    (a sync per step): True once every row holds a stop string."""

    def __init__(self, tokenizer, rows: int, stops: tuple, streamer=None):
        self.tokenizer, self.stops, self.streamer = tokenizer, stops, streamer
        self.ids, self.done = [[] for _ in range(rows)], [False] * rows
        # the last tokens enough to hold a stop string ending in the newest one: a token decodes
        # to one byte or more, a character is at most 4 bytes (+3 of a character cut at the start)
        self.tail = 4 * max(map(len, stops), default=0) + 3

    def __call__(self, tokens: torch.Tensor) -> bool:
        for row, token in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row][-self.tail :]) if self.stops else ""
            self.done[row] = any(s in text for s in self.stops)
        if self.streamer is not None:
            self.streamer(self.ids[0], final=self.done[0])
        return bool(self.stops) and all(self.done)


@torch.no_grad()
@without_cudnn_attention
def _generate_ids(
    model,
    prompts: list,
    budget: int,
    use_cache: bool,
    draw,
    on_token=None,
    warn=None,
    compile: bool | str = False,
    span_bucket: int = 0,
    window: bool = False,
) -> list:
    """New ids of each prompt (lists of ids, every row given `budget` tokens, which fit
    model.max_seq_len unless `window`), through the one stepping strategy (models/decoding.py);
    with `window`, Windowed steps past model.max_seq_len."""
    device = next(model.parameters()).device
    limit = model.config.max_seq_len
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        idx[row, : len(ids)] = torch.tensor(ids, device=device)
    # the last token drawn is never fed back, so it needs no place in the cache
    needed = max(int(lengths.max()) + budget - 1, 1)
    max_len = min(needed, limit)
    if compile:  # compiled steps are kept per cache shape: round it up, so later calls reuse them
        max_len = min(limit, -(-max_len // COMPILE_LEN_ROUND) * COMPILE_LEN_ROUND)
    steps = open_steps(
        model,
        len(prompts),
        max_len,
        device,
        use_cache=use_cache,
        compile=compile,
        span_bucket=span_bucket,
        warn=warn,
    )
    if needed > limit:  # only with `window`: the caller gives no other row such a budget
        steps = Windowed(steps, model, len(prompts), limit, device)
    with steps:
        out = decode_loop(steps, steps.prefill(idx, lengths), budget, draw, on_token)
        note = steps.overflow_note()
    if note and warn is not None:  # once per batch, after decoding: counting them is a host sync
        warn(note)
    return torch.stack(out, 1).tolist() if out else [[] for _ in prompts]


def sampler(
    prompts: list,
    usable: int,
    temperature: float,
    top_k,
    top_p,
    greedy: bool,
    generator,
    repetition_penalty: float,
    device,
):
    """draw(logits) -> (B,) tokens for rows starting with these prompts (lists of ids): among the
    first `usable` ids (a model.vocab_size padded past the tokenizer's has no symbol for the
    rest), after the repetition penalty over each row's tokens so far (1: off)."""
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), usable, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            seen[row, ids] = True
    rows = torch.arange(len(prompts), device=device)

    def draw(logits):
        logits = logits[:, :usable]
        if seen is not None:
            logits = penalize(logits, seen, repetition_penalty)
        tokens = pick(logits, temperature, top_k, top_p, greedy, generator)
        if seen is not None:
            seen[rows, tokens] = True
        return tokens

    return draw


def auto_compile(model, device: torch.device, steps: int) -> bool:
    """generate's default (compile=None): on CUDA, compile once this model's eager decode steps in
    this process, `steps` (the call's new tokens per row) included, reach COMPILE_AFTER_STEPS (see
    there); a model with compiled steps kept from an earlier call keeps compiling; never on a CPU.
    Counts the steps."""
    if device.type != "cuda":
        return False
    if model.__dict__.get("compiled_steps"):
        return True
    seen = model.__dict__.get("eager_decode_steps", 0) + steps
    model.__dict__["eager_decode_steps"] = seen
    return seen >= COMPILE_AFTER_STEPS


def generate(
    model,
    tokenizer,
    prompts,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    use_cache: bool = True,
    stream=None,
    warn=None,
    compile: bool | str | None = None,
    span_bucket: int = 0,
    *,
    num_samples: int = 1,
    repetition_penalty: float = 1.0,
    stop=None,
    window: bool = False,
):
    """The completion (new text only) of each prompt: `prompts` a str (one prompt) gives a str, a
    list of str gives a list; with `num_samples` > 1 each prompt's completion is a list of that
    many. An empty prompt generates from nothing (`start_ids`). `top_k` None or 0 and `top_p` None
    or 1 are off. `repetition_penalty`: transformers' (`penalize`), 1 off. `stop`: a str or a list
    of str; a row ends at the first one in its completion, which is cut before it. `window`: go on
    past model.max_seq_len as nanoGPT's sample does (see the module docstring); off: a row stops
    early where its next token would need a position past model.max_seq_len, and a longer prompt
    is refused. `stream(piece: str)`: called with each new piece of the completion as it comes
    (pieces join to the completion), for one prompt and num_samples=1 only. `seed`: a
    torch.Generator on the model's device (None: torch's global RNG). `warn(message)`: told of
    words mapped to <unk>, of rows stopped at or sliding past max_seq_len. ValueError (one line)
    for a bad setting, a tokenizer the model was not trained with (`check_tokenizer`), a prompt
    that is not UTF-8 or (window off) longer than model.max_seq_len, or symbols outside a
    vocabulary without <unk>. A model whose vocabulary is padded past the tokenizer's
    (model.vocab_size) draws among the tokenizer's ids only.

    `compile`: decode through the compiled step (torch.compile, and on CUDA a CUDA graph), kept on
    the model for later calls of the same shapes (models/decoding.py); None: `auto_compile`'s rule
    (compile on CUDA once it pays); a string: a torch.compile backend. `span_bucket` (compiled
    only): each step attends over its position rounded up to a multiple of it, one compiled graph
    per span; 0: the whole cache, one graph. Eager steps always attend over the positions
    reached."""
    texts, single = as_prompts(prompts)
    check_settings(
        max_new_tokens, temperature, top_k, top_p, greedy, num_samples, repetition_penalty
    )
    stops = check_stops(stop)
    if stream is not None and len(texts) * num_samples != 1:
        raise ValueError(
            f"stream takes one completion: one prompt and num_samples=1 (got {len(texts)} "
            f"prompt(s), num_samples={num_samples})"
        )
    check_tokenizer(model, tokenizer, warn)
    limit = model.config.max_seq_len
    ids = [encode_prompt(tokenizer, text, limit, warn, window) for text in texts]
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    if compile is None:
        compile = auto_compile(model, device, max_new_tokens)

    # rows of one budget run as one batch. Window off: a row may generate while its next position
    # exists (prompt + new <= max_seq_len + 1, the last token never fed), so prompts near the limit
    # get a batch of their own; window on: every row its max_new_tokens
    budgets = []
    for text, p in zip(texts, ids, strict=True):
        fits = max(0, min(max_new_tokens, limit + 1 - len(p)))
        budgets.append(max_new_tokens if window else fits)
        if fits < max_new_tokens and warn is not None:
            warn(
                f"prompt {text[:40]!r}: passes model.max_seq_len={limit} after {fits} new tokens; "
                f"sliding window on: each later token sees the last {limit} tokens only"
                if window
                else f"prompt {text[:40]!r}: stops after {fits} new tokens, at "
                f"model.max_seq_len={limit} (sliding window off: window=True or --window goes on)"
            )
    rows = [r for r in range(len(ids)) for _ in range(num_samples)]
    new = [[] for _ in rows]
    for budget in dict.fromkeys(budgets):
        batch = [i for i, r in enumerate(rows) if budgets[r] == budget]
        if budget == 0:
            continue
        prompt_ids = [ids[rows[i]] for i in batch]
        streamer = None if stream is None else _Streamer(tokenizer, stream, stops)
        watch = None
        if stops or streamer is not None:
            watch = _Watch(tokenizer, len(batch), stops, streamer)
        draw = sampler(
            prompt_ids,
            tokenizer.vocab_size,
            temperature,
            top_k,
            top_p,
            greedy,
            generator,
            repetition_penalty,
            device,
        )
        got = _generate_ids(
            model, prompt_ids, budget, use_cache, draw, watch, warn, compile, span_bucket, window
        )
        for i, row_ids in zip(batch, got, strict=True):
            new[i] = row_ids
        if streamer is not None:
            streamer(got[0], final=True)
    texts_out = [trim(tokenizer.decode(n), stops) for n in new]
    out = [
        texts_out[r * num_samples : (r + 1) * num_samples] if num_samples > 1 else texts_out[r]
        for r in range(len(ids))
    ]
    return out[0] if single else out


# --- command line ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moa-generate",
        description="Generate text from a trained decoder-only LM run.",
        epilog="Unknown symbols: a word vocabulary (WikiText-2's), and a char vocabulary trained "
        "with data.unk=true (data=text's default), hold <unk>: unknown words or characters map to "
        "it with a note on stderr; a char vocabulary without it refuses a prompt character outside "
        "it (exit 2, naming it). An empty prompt generates from nothing (after a "
        "line end: the tokenizers have no BOS token). Sliding window off (the default): a prompt "
        "longer than model.max_seq_len is refused and a completion stops early where it would "
        "pass model.max_seq_len (a note says so); --window goes on as nanoGPT's sample does. "
        "Prompts must be UTF-8. Runs from before tokenizers were saved in the run folder "
        "(tokenizer.json) cannot be generated from; a tokenizer.json that is not the one the "
        "checkpoint records is refused (checkpoints written before they recorded it: its "
        "vocabulary size is checked, with a note).",
    )
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a run folder (with checkpoints/ and tokenizer.json)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text ('' generates from nothing)")
    source.add_argument(
        "--prompt-file",
        type=Path,
        help="a UTF-8 file of prompts, one per line (a blank line is an empty prompt, with a note)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="tokens to generate per prompt (default 200)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="completions per prompt, sampled as rows of one batch (default 1)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help=f"softmax temperature, > 0 (default 1.0); below {MIN_TEMPERATURE:.3g} it acts as "
        f"{MIN_TEMPERATURE:.3g}: greedy, ties shared",
    )
    p.add_argument(
        "--top-k", type=int, help="sample among the k most likely tokens (0 or unset: off)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: the most likely tokens holding this much mass (1 or unset: off)",
    )
    p.add_argument(
        "--greedy", action="store_true", help="always the most likely token (no sampling)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty: logits of tokens already in the row divided by it "
        "where positive, multiplied where negative; > 1 discourages repeats (default 1: off)",
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help=r"end a completion at TEXT (cut before it); repeat for several; \n, \t and \\ are "
        "read as newline, tab and backslash",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the completion as its tokens come; default: on for one prompt and one sample "
        "(the only case it takes)",
    )
    p.add_argument(
        "--window",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sliding window (nanoGPT's sample): a longer prompt keeps its last model.max_seq_len "
        "tokens, and past it each token sees the last model.max_seq_len tokens (full forwards, "
        "slower); default off: completions stop at model.max_seq_len",
    )
    p.add_argument("--seed", type=int, help="seed of the sampling generator (reproducible samples)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a checkpoint file (default: the run's latest that verifies, as load_run chooses)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda where available",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="a full forward per token instead of the KV cache"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode through the compiled step (torch.compile; on CUDA a CUDA graph); default: on "
        f"CUDA from {COMPILE_AFTER_STEPS} decode steps (prompts x new tokens; compiling costs more "
        "than it saves below)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="the weights' and the cache's dtype; default: bf16 on CUDA, fp32 on a CPU",
    )
    p.add_argument(
        "--inference-routing",
        choices=("soft", "top1"),
        help="moas_dynamic runs: soft (mix the branches as trained) or top1 (each token's argmax "
        "branch "
        "only); default: the run's model.inference_routing",
    )
    return p


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""--stop's text with \n, \t and \\ read as newline, tab and backslash."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def _prompts(args, note) -> list:
    """The prompts of --prompt or --prompt-file (one per line; blank lines kept as empty prompts,
    with a note naming them)."""
    from moa_train.data.corpus import DataError, utf8

    try:
        if args.prompt is not None:  # argv's undecodable bytes come as lone surrogates
            return [utf8(os.fsencode(args.prompt), "--prompt")]
        raw = args.prompt_file.read_bytes()
        prompts = utf8(raw, f"--prompt-file {args.prompt_file}").splitlines()
    except OSError as exc:
        fail(f"--prompt-file: cannot read {args.prompt_file} ({exc.strerror})")
    except DataError as exc:
        fail(str(exc))
    if not prompts:
        fail(f"--prompt-file: {args.prompt_file} holds no prompt")
    blank = [str(n) for n, line in enumerate(prompts, 1) if not line.strip()]
    if blank:
        more = f" (+{len(blank) - 10})" if len(blank) > 10 else ""
        note(
            f"--prompt-file {args.prompt_file}: line(s) {', '.join(blank[:10])}{more} blank: "
            "generated from nothing, as empty prompts"
        )
    return prompts


def note(message):
    print(f"note: {message}", file=sys.stderr)


def main(argv=None) -> None:
    from moa_train.api import load_checkpoint_model, load_tokenizer
    from moa_train.train.checkpoint import CheckpointError

    args = parser().parse_args(argv)
    try:
        check_settings(
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.greedy,
            args.num_samples,
            args.repetition_penalty,
        )
        stops = check_stops([unescape(s) for s in args.stop or ()])
    except ValueError as exc:
        fail(f"--{str(exc).replace('_', '-')}")
    prompts = _prompts(args, note)
    rows = len(prompts) * args.num_samples
    if args.stream and rows != 1:
        fail(
            f"--stream prints one completion as it comes: give one prompt and --num-samples 1 "
            f"(got {len(prompts)} prompt(s) x {args.num_samples}), or drop --stream"
        )
    streaming = rows == 1 and args.stream is not False
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here; use --device cpu")
    try:
        model, _, _ = load_checkpoint_model(args.checkpoint or args.run_dir, device, lm_only=True)
        dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
        model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        tokenizer = load_tokenizer(args.run_dir)
        if args.inference_routing is not None:
            set_inference_routing(model, args.inference_routing)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        fail(str(exc).splitlines()[0])

    started = []

    def stream(piece):  # the prompt first, once it is known to be accepted
        if not started:
            print(prompts[0], end="")
            started.append(True)
        print(piece, end="", flush=True)

    try:
        completions = generate(
            model,
            tokenizer,
            prompts,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.greedy,
            args.seed,
            not args.no_cache,
            stream if streaming else None,
            note,
            args.compile,
            num_samples=args.num_samples,
            repetition_penalty=args.repetition_penalty,
            stop=stops,
            window=args.window,
        )
    except ValueError as exc:
        fail(str(exc))
    if streaming:
        print("" if started else prompts[0])
        return
    if args.num_samples == 1:
        completions = [[c] for c in completions]
    pairs = [(p, c) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    if len(pairs) == 1:
        print(pairs[0][0] + pairs[0][1])
        return
    for prompt, completion in pairs:
        print(f"{prompt}{completion}\n")


if __name__ == "__main__":
    main()
