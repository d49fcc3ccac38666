"""Text from a trained decoder-only LM: `generate` (the Python API) and `moa-generate RUN_DIR` (the
command line).

Prompts are batched right-padded with per-row lengths: one prefill, then one token per row per step
through the model's KV cache (`init_cache` / `prefill` / `decode_step`); `use_cache=False`
(`--no-cache`) recomputes a full forward over each row every step instead, with the same results.
Sampling: temperature, top-k, top-p (nucleus) or greedy, drawn from a torch.Generator on the model's
device, so a seed reproduces a sample.

Lengths: a prompt longer than model.max_seq_len is refused (one line); a row stops early when its
next token would need a position past model.max_seq_len (the model has no embedding for it), so its
completion may be shorter than max_new_tokens.

The tokenizer must be the one the model was trained with: a checkpoint records it (the sha256 of
tokenizer.json and its vocabulary size) and another is refused (one line naming both files); a
checkpoint from before that is checked by vocabulary size only, with a note.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from moa_train.errors import Parser, fail
from moa_train.models.decoding import decode_loop, open_steps, release_compiled
from moa_train.models.kv_cache import without_cudnn_attention

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


def set_inference_routing(model, mode: str) -> None:
    """model.inference_routing of a trained moas_dynamic model, chosen at generation time: soft (as
    trained) or top1 (each token's argmax branch; see MoASAttention.through_cache). ValueError (one
    line) for a model without a router over attention schemes."""
    if mode not in ("soft", "top1"):
        raise ValueError(f"inference routing {mode!r}: valid: soft, top1")
    routed = [
        m
        for m in model.modules()
        if getattr(m, "dynamic", False) and hasattr(m, "inference_routing")
    ]
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
    """(B,) next tokens from (B, V) logits."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float()
    # at most 0 before the division, so no temperature overflows them to inf (nan in the softmax)
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and top_k < logits.shape[-1]:
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


def check_settings(max_new_tokens: int, temperature: float, top_k, top_p, greedy: bool) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}) unless greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")


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


def encode_prompt(tokenizer, text: str, max_seq_len: int, warn=None) -> list:
    """The prompt's ids. Text that is not UTF-8 (lone surrogates: the bytes Python could not decode)
    is refused. Symbols outside a vocabulary without <unk> (char) are refused, naming them; with
    <unk> (word) they map to it and `warn(message)` is told."""
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
        if UNK not in getattr(tokenizer, "stoi", {}):
            raise ValueError(
                f"prompt {text[:40]!r}: {names} not in the run's {tokenizer.kind} vocabulary, "
                f"which has no {UNK}"
            )
        if warn is not None:
            warn(
                f"prompt {text[:40]!r}: {names} not in the run's {tokenizer.kind} vocabulary: "
                f"mapped to {UNK}"
            )
    ids = [int(i) for i in tokenizer.encode(text)]
    if not ids:
        raise ValueError(f"prompt {text!r} is empty: give at least one symbol")
    if len(ids) > max_seq_len:
        raise ValueError(
            f"prompt {text[:40]!r} is {len(ids)} tokens, longer than "
            f"model.max_seq_len={max_seq_len}"
        )
    return ids


class _Streamer:
    """Hands each new piece of a completion to `callback`, holding back a piece that ends inside a
    UTF-8 character (byte-level BPE)."""

    def __init__(self, tokenizer, callback):
        self.tokenizer, self.callback, self.sent = tokenizer, callback, 0

    def __call__(self, ids: list, final: bool = False) -> None:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.sent:
            self.callback(text[self.sent :])
            self.sent = len(text)


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
) -> list:
    """New ids of each prompt (lists of ids, every row given `budget` tokens, which fit
    model.max_seq_len), through the one stepping strategy (models/decoding.py)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        idx[row, : len(ids)] = torch.tensor(ids, device=device)
    # the last token drawn is never fed back, so it needs no place in the cache
    max_len = max(int(lengths.max()) + budget - 1, 1)
    if compile:  # compiled steps are kept per cache shape: round it up, so later calls reuse them
        max_len = min(
            model.config.max_seq_len, -(-max_len // COMPILE_LEN_ROUND) * COMPILE_LEN_ROUND
        )
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
    with steps:
        out = decode_loop(steps, steps.prefill(idx, lengths), budget, draw, on_token)
        note = steps.overflow_note()
    if note and warn is not None:  # once per batch, after decoding: counting them is a host sync
        warn(note)
    return torch.stack(out, 1).tolist() if out else [[] for _ in prompts]


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
    prompts: list,
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
) -> list:
    """The completion (new text only) of each prompt. `stream(piece)`: each new piece of text as it
    comes, for a single prompt. `seed`: a torch.Generator on the model's device (None: torch's
    global RNG). `warn(message)`: told of words mapped to <unk> and of rows stopped at max_seq_len.
    ValueError (one line) for a bad setting, a tokenizer the model was not trained with
    (`check_tokenizer`), a prompt that is not UTF-8 or longer than model.max_seq_len, or symbols
    outside a vocabulary without <unk>. A row stops early where its next token would need a
    position past model.max_seq_len. A model whose vocabulary is padded past the tokenizer's
    (model.vocab_size) draws among the tokenizer's ids only.

    `compile`: decode through the compiled step (torch.compile, and on CUDA a CUDA graph), kept on
    the model for later calls of the same shapes (models/decoding.py); None: `auto_compile`'s rule
    (compile on CUDA once it pays); a string: a torch.compile backend. `span_bucket` (compiled
    only): each step attends over its position rounded up to a multiple of it, one compiled graph
    per span; 0: the whole cache, one graph. Eager steps always attend over the positions
    reached."""
    check_settings(max_new_tokens, temperature, top_k, top_p, greedy)
    if stream is not None and len(prompts) != 1:
        raise ValueError(f"stream takes a single prompt (got {len(prompts)})")
    check_tokenizer(model, tokenizer, warn)
    limit = model.config.max_seq_len
    ids = [encode_prompt(tokenizer, text, limit, warn) for text in prompts]
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    usable = tokenizer.vocab_size  # ids of a model.vocab_size padded past it have no symbol

    def draw(logits):
        return pick(logits[:, :usable], temperature, top_k, top_p, greedy, generator)

    if compile is None:
        compile = auto_compile(model, device, max_new_tokens)

    # rows of one budget run as one batch: a row may generate while its next position exists (prompt
    # + new <= max_seq_len + 1, the last token never fed), so prompts near the limit get a batch of
    # their own
    budgets = [max(0, min(max_new_tokens, limit + 1 - len(p))) for p in ids]
    for text, budget in zip(prompts, budgets, strict=True):
        if budget < max_new_tokens and warn is not None:
            warn(
                f"prompt {text[:40]!r}: stops after {budget} new tokens, at "
                f"model.max_seq_len={limit}"
            )
    new = [None] * len(ids)
    for budget in dict.fromkeys(budgets):
        rows = [r for r, b in enumerate(budgets) if b == budget]
        if budget == 0:
            new = [[] if r in rows else n for r, n in enumerate(new)]
            continue
        on_token = None
        if stream is not None:
            streamer, so_far = _Streamer(tokenizer, stream), []

            def on_token(tokens, so_far=so_far, streamer=streamer):
                so_far.append(int(tokens[0]))
                streamer(so_far)

        for row, got in zip(
            rows,
            _generate_ids(
                model,
                [ids[r] for r in rows],
                budget,
                use_cache,
                draw,
                on_token,
                warn,
                compile,
                span_bucket,
            ),
            strict=True,
        ):
            new[row] = got
        if stream is not None:
            streamer(so_far, final=True)
    return [tokenizer.decode(n) for n in new]


# --- command line ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moa-generate",
        description="Generate text from a trained decoder-only LM run.",
        epilog="Unknown symbols: a char vocabulary has no <unk>, so a prompt character outside it "
        "is refused "
        "(exit 2, naming it); a word vocabulary (WikiText-2's) holds <unk>, and unknown words map "
        "to it with a note on stderr. A prompt longer than model.max_seq_len is refused; a "
        "completion stops early where it would pass model.max_seq_len. Prompts must be UTF-8. Runs "
        "from before tokenizers were saved in the run folder (tokenizer.json) cannot be generated "
        "from; a tokenizer.json that is not the one the checkpoint records is refused (checkpoints "
        "written before they recorded it: its vocabulary size is checked, with a note).",
    )
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a run folder (with checkpoints/ and tokenizer.json)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="a UTF-8 file of prompts, one per line")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="tokens to generate per prompt (default 200)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help=f"softmax temperature, > 0 (default 1.0); below {MIN_TEMPERATURE:.3g} it acts as "
        f"{MIN_TEMPERATURE:.3g}: greedy, ties shared",
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: the most likely tokens holding this much mass",
    )
    p.add_argument(
        "--greedy", action="store_true", help="always the most likely token (no sampling)"
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


def _prompts(args) -> list:
    from moa_train.data.corpus import DataError, utf8

    try:
        if args.prompt is not None:  # argv's undecodable bytes come as lone surrogates
            return [utf8(os.fsencode(args.prompt), "--prompt")]
        raw = args.prompt_file.read_bytes()
        lines = utf8(raw, f"--prompt-file {args.prompt_file}").splitlines()
    except OSError as exc:
        fail(f"--prompt-file: cannot read {args.prompt_file} ({exc.strerror})")
    except DataError as exc:
        fail(str(exc))
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        fail(f"--prompt-file: {args.prompt_file} holds no prompt")
    return prompts


def main(argv=None) -> None:
    from moa_train.api import load_checkpoint_model, load_tokenizer
    from moa_train.train.checkpoint import CheckpointError

    args = parser().parse_args(argv)
    try:
        check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.greedy)
    except ValueError as exc:
        fail(f"--{str(exc).replace('_', '-')}")
    prompts = _prompts(args)
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

    def note(message):
        print(f"note: {message}", file=sys.stderr)

    single, started = len(prompts) == 1, []

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
            stream if single else None,
            note,
            args.compile,
        )
    except ValueError as exc:
        fail(str(exc))
    if single:
        print("" if started else prompts[0])
        return
    for prompt, completion in zip(prompts, completions, strict=True):
        print(f"{prompt}{completion}\n")


if __name__ == "__main__":
    main()
