"""Generating from a run folder: the tokenizer saved with the run, `moa_train.generate` (cached and
uncached, greedy and seeded sampling, batches of prompts) and `moa-generate`'s one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import moa_train
from conftest import REPO
from test_bad_input_generation import run_cli

RUN = ("model=mha", "trainer.max_steps=6", "trainer.eval_interval=6")


@pytest.fixture(scope="module")
def char_run(train_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("char_run")
    train_run(run_dir, *RUN)
    return run_dir


@pytest.fixture(scope="module")
def loaded(char_run):
    model, _ = moa_train.load_run(char_run)
    return model, moa_train.load_tokenizer(char_run)


def test_the_run_folder_holds_its_char_tokenizer_which_round_trips_text(
    char_run, loaded, wikitext_texts
):
    assert (char_run / "tokenizer.json").is_file()
    model, tok = loaded
    text = wikitext_texts["valid"][:2000]
    assert tok.kind == "char" and tok.vocab_size == model.vocab_size == len(
        set(wikitext_texts["train"])
    )
    assert tok.decode(tok.encode(text)) == text


def test_a_word_vocabulary_round_trips_wikitext_lines_and_maps_unknown_words_to_unk():
    from moa_train.data.tokenizer import WordTokenizer, tokenizer_from_json, tokenizer_json
    from moa_train.generation import encode_prompt

    text = " = Valkyria = \n \n The game began in 2010 . \n"
    tok = tokenizer_from_json(tokenizer_json(WordTokenizer(text)))
    assert tok.decode(tok.encode(text)) == text
    warned = []
    ids = encode_prompt(tok, "The zebra began", 32, warned.append)
    assert tok.decode(ids) == " The <unk> began" and "'zebra'" in warned[0] and "<unk>" in warned[0]


def test_greedy_generation_is_the_same_with_and_without_the_cache(loaded):
    model, tok = loaded
    cached = moa_train.generate(model, tok, ["The "], max_new_tokens=20, greedy=True)
    uncached = moa_train.generate(
        model, tok, ["The "], max_new_tokens=20, greedy=True, use_cache=False
    )
    assert cached == uncached and len(cached[0]) == 20


def test_a_variant_without_the_cache_contract_generates_with_full_forwards(loaded):
    """A plugin's attention module without `forward_cached` still generates (full forwards, the same
    tokens)."""
    import copy

    import torch

    from moa_train.models.kv_cache import has_kv_cache

    class Uncached(torch.nn.Module):  # forward only, as a plugin's module may be
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    model, tok = loaded
    assert has_kv_cache(model)
    want = moa_train.generate(model, tok, ["The "], max_new_tokens=10, greedy=True)
    plain = copy.deepcopy(model)
    for block in plain.blocks:
        block.attn = Uncached(block.attn)
    assert not has_kv_cache(plain)
    assert moa_train.generate(plain, tok, ["The "], max_new_tokens=10, greedy=True) == want


def test_seeded_sampling_reproduces_and_different_seeds_differ(loaded):
    model, tok = loaded
    prompts = ["The game ", "In "]
    first = moa_train.generate(model, tok, prompts, max_new_tokens=30, seed=1, top_p=0.95)
    again = moa_train.generate(model, tok, prompts, max_new_tokens=30, seed=1, top_p=0.95)
    other = moa_train.generate(model, tok, prompts, max_new_tokens=30, seed=2, top_p=0.95)
    assert first == again and first != other


def test_top_k_1_sampling_is_greedy(loaded):
    model, tok = loaded
    greedy = moa_train.generate(model, tok, ["A "], max_new_tokens=15, greedy=True)
    assert (
        moa_train.generate(model, tok, ["A "], max_new_tokens=15, top_k=1, temperature=0.7, seed=3)
        == greedy
    )


def test_a_batch_of_prompts_of_different_lengths_gives_each_prompts_own_result(loaded):
    model, tok = loaded
    prompts = ["T", "The song was recorded ", "In 1990 the "]
    batch = moa_train.generate(model, tok, prompts, max_new_tokens=12, greedy=True)
    assert batch == [
        moa_train.generate(model, tok, [p], max_new_tokens=12, greedy=True)[0] for p in prompts
    ]


def test_cached_generation_attends_over_the_live_context_only(loaded, monkeypatch):
    """Each decode step attends over the positions any row has reached (the widest prompt + steps so
    far), not the whole cache; the same text as the full forwards (checked above and here)."""
    from moa_train.models.lm import LanguageModel

    model, tok = loaded
    spans, decode_step = [], LanguageModel.decode_step

    def spy(self, tokens, cache, span=None):
        spans.append((span, cache.max_len))
        return decode_step(self, tokens, cache, span=span)

    monkeypatch.setattr(LanguageModel, "decode_step", spy)
    prompts = ["The song ", "In 1990 the band "]
    cached = moa_train.generate(model, tok, prompts, max_new_tokens=6, greedy=True)
    width = max(len(tok.encode(p)) for p in prompts)
    # 6 tokens: 5 steps, the last never fed
    assert [s for s, _ in spans] == [width + 1 + j for j in range(5)]
    assert spans[-1][0] == spans[-1][1]  # the last step reaches the end of the cache
    assert cached == moa_train.generate(
        model, tok, prompts, max_new_tokens=6, greedy=True, use_cache=False
    )


def test_streaming_hands_over_the_completion_piece_by_piece(loaded):
    model, tok = loaded
    pieces = []
    (completion,) = moa_train.generate(
        model, tok, ["The "], max_new_tokens=10, greedy=True, stream=pieces.append
    )
    assert len(pieces) == 10 and "".join(pieces) == completion


def test_a_row_stops_at_max_seq_len_and_a_longer_prompt_is_refused(loaded):
    model, tok = loaded
    limit = model.config.max_seq_len
    near = "a" * (limit - 3)
    out = moa_train.generate(model, tok, [near, "b"], max_new_tokens=10, greedy=True)
    assert len(out[0]) == 4 and len(out[1]) == 10  # the last position's token is drawn, never fed
    with pytest.raises(ValueError, match=f"longer than model.max_seq_len={limit}"):
        moa_train.generate(model, tok, ["a" * (limit + 1)], max_new_tokens=1)


def cli(*args, env=None, cwd=None) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-m", "moa_train.generation", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    return out.returncode, out.stdout, [line for line in out.stderr.splitlines() if line.strip()]


def test_a_run_folder_copied_elsewhere_generates_without_the_data(char_run, loaded, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(char_run, copy)
    code, out, err = cli(
        copy,
        "--prompt",
        "The ",
        "--max-new-tokens",
        "25",
        "--greedy",
        "--device",
        "cpu",
        env={"MOA_DATA_DIR": str(tmp_path / "nowhere"), "MOA_CACHE_DIR": str(tmp_path / "c")},
    )
    assert code == 0, err
    model, tok = loaded
    assert (
        out
        == "The "
        + moa_train.generate(model, tok, ["The "], max_new_tokens=25, greedy=True)[0]
        + "\n"
    )


def test_several_prompts_from_a_file_print_each_completion(char_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The \nIn 1990\n")
    code, out, err = cli(char_run, "--prompt-file", prompts, "--max-new-tokens", "5", "--seed", "0")
    assert code == 0, err
    blocks = out.split("\n\n")
    assert blocks[0].startswith("The ") and blocks[1].startswith("In 1990")


@pytest.fixture(scope="module")
def translation_like(char_run, tmp_path_factory):
    """A copy of the char run whose checkpoints claim task translation."""
    import torch

    from moa_train.train.checkpoint import atomic_save

    folder = tmp_path_factory.mktemp("translation_like")
    (folder / "checkpoints").mkdir()
    path = sorted((char_run / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(path, weights_only=True)
    state["config"]["task"] = {"name": "translation"}
    atomic_save(state, folder / "checkpoints" / path.name)
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "no checkpoint",
        "temperature",
        "too long",
        "unknown char",
        "translation",
        "both prompts",
        "no prompt",
        "old run",
        "routing without a router",
    ],
)
def test_bad_input_gives_one_line_and_exit_2(case, char_run, translation_like, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(char_run, old)
    (old / "tokenizer.json").unlink()
    args, expected = {
        "no checkpoint": ((tmp_path, "--prompt", "x"), "no checkpoint under"),
        "temperature": (
            (char_run, "--prompt", "x", "--temperature", "0"),
            "temperature must be > 0",
        ),
        "too long": ((char_run, "--prompt", "a" * 40), "longer than model.max_seq_len=32"),
        "unknown char": (
            (char_run, "--prompt", "The \u263a\u2603"),
            "'☺', '☃' not in the run's char vocabulary",
        ),
        "translation": (
            (translation_like, "--prompt", "x"),
            "translation run: only decoder-only LM",
        ),
        "both prompts": (
            (char_run, "--prompt", "x", "--prompt-file", "f.txt"),
            "not allowed with argument",
        ),
        "no prompt": ((char_run,), "one of the arguments --prompt --prompt-file is required"),
        "old run": ((old, "--prompt", "x"), "predates saved tokenizers"),
        "routing without a router": (
            (char_run, "--prompt", "x", "--inference-routing", "top1"),
            "(mha) has no router over attention schemes",
        ),
    }[case]
    code, out, err = cli(*args)
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: "), (
        code,
        out,
        err,
    )
    assert expected in err[0], err[0]


def test_top1_inference_routing_chosen_at_generation_time(loaded):
    """A moas_dynamic model switched to top1 routing generates the same greedy text through the
    cache as by full forwards (both route each token to its argmax branch)."""
    import torch
    from omegaconf import OmegaConf

    from moa_train import config
    from moa_train.generation import set_inference_routing
    from moa_train.models.lm import LanguageModel

    _, tok = loaded
    m = OmegaConf.structured(
        config.VARIANTS["moas_dynamic"](
            name="moas_dynamic", d_model=32, n_layer=2, n_head=4, max_seq_len=32, dropout=0.0
        )
    )
    torch.manual_seed(0)
    model = LanguageModel(m, tok.vocab_size).eval()
    for name, p in model.named_parameters():
        if "router" in name:
            torch.nn.init.normal_(p, std=0.5)
    soft = moa_train.generate(model, tok, ["The "], max_new_tokens=20, greedy=True)
    set_inference_routing(model, "top1")
    assert {blk.attn.inference_routing for blk in model.blocks} == {"top1"}
    cached = moa_train.generate(model, tok, ["The "], max_new_tokens=20, greedy=True)
    assert cached == moa_train.generate(
        model, tok, ["The "], max_new_tokens=20, greedy=True, use_cache=False
    )
    assert len(cached[0]) == len(soft[0]) == 20


def test_a_cache_entry_from_before_saved_tokenizers_is_rebuilt_with_one(make_cfg, caplog):
    from moa_train.data import load_data

    cfg = make_cfg("data=wikitext2_word")
    first = load_data(cfg.data)
    first.tokenizer_file.unlink()
    with caplog.at_level("WARNING"):
        again = load_data(cfg.data)
    assert "tokenizer.json is missing" in caplog.text and again.tokenizer_file.is_file()
    from moa_train.data.tokenizer import tokenizer_from_json

    tok = tokenizer_from_json(again.tokenizer_file.read_text(encoding="utf-8"))
    assert tok.kind == "word" and tok.vocab_size == again.vocab_size


def test_a_bpe_runs_tokenizer_file_loads_and_round_trips(make_cfg, wikitext_texts):
    from moa_train.data import load_data
    from moa_train.data.tokenizer import tokenizer_from_json

    data = load_data(make_cfg("data=wikitext2_bpe", "data.vocab_size=400").data)
    tok = tokenizer_from_json(data.tokenizer_file.read_text(encoding="utf-8"))
    text = wikitext_texts["test"][:1000] + "naïve ☺"
    assert (
        tok.kind == "bpe"
        and tok.vocab_size == data.vocab_size
        and tok.decode(tok.encode(text)) == text
    )


def test_auto_compile_waits_until_compiling_pays():
    """compile=None: never on a CPU; on CUDA once the model's eager decode steps reach
    COMPILE_AFTER_STEPS, and from then on."""
    import torch

    from moa_train import generation

    model = torch.nn.Linear(2, 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not generation.auto_compile(model, cpu, 10**6)
    limit = generation.COMPILE_AFTER_STEPS
    assert not generation.auto_compile(model, cuda, limit // 2)
    assert not generation.auto_compile(model, cuda, limit // 2 - 1)
    assert generation.auto_compile(model, cuda, 1)
    fresh = torch.nn.Linear(2, 2)
    fresh.__dict__["compiled_steps"] = {"kept": object()}
    assert generation.auto_compile(fresh, cuda, 1)


# --- issue 29: prompts, window, sampling options, stop strings, streaming -------------------------


def lively(tok, preset: str = "mha", max_seq_len: int = 16):
    """An untrained tiny model of the run's vocabulary with spread weights (its greedy text varies,
    unlike the 6-step run's), max_seq_len small enough for the window to slide."""
    import torch

    from moa_train.models.conformance import _spread_weights, tiny_config
    from moa_train.models.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(tiny_config(preset, max_seq_len=max_seq_len), tok.vocab_size).eval()
    _spread_weights(model, 0)
    return model


@pytest.fixture(scope="module")
def live(loaded):
    _, tok = loaded
    return lively(tok), tok


def nanogpt_greedy(model, ids: list, n: int, penalty: float = 1.0) -> list:
    """nanoGPT's sample loop, greedy: each token from a full forward over the last max_seq_len
    tokens; with transformers' repetition penalty (gather, where, scatter) over all tokens so
    far."""
    import torch

    ids, limit = list(ids), model.config.max_seq_len
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-limit:]]))[0][0, -1]
            seen = torch.tensor(sorted(set(ids)))
            score = logits.gather(0, seen)
            logits = logits.scatter(
                0, seen, torch.where(score < 0, score * penalty, score / penalty)
            )
            ids.append(int(logits.argmax()))
    return ids[start:]


def test_a_str_prompt_is_one_prompt_and_gives_a_str(live):
    model, tok = live
    (want,) = moa_train.generate(model, tok, ["The "], max_new_tokens=8, greedy=True)
    got = moa_train.generate(model, tok, "The ", max_new_tokens=8, greedy=True)
    assert isinstance(got, str) and got == want and len(got) == 8
    assert moa_train.generate(model, tok, [], max_new_tokens=8) == []
    with pytest.raises(ValueError, match=r"prompts must be a str .* \(got a list holding int\)"):
        moa_train.generate(model, tok, [1, 2], max_new_tokens=8)


def test_an_empty_prompt_generates_after_a_line_end(live):
    """As transformers' generate with no input starts from BOS; these vocabularies have none, and a
    line end precedes every line of the training text."""
    from moa_train.data.tokenizer import CharTokenizer, WordTokenizer
    from moa_train.generation import start_ids

    model, tok = live
    from_nothing = moa_train.generate(model, tok, ["", "\n"], max_new_tokens=10, greedy=True)
    assert from_nothing[0] == from_nothing[1] and len(from_nothing[0]) == 10
    word = WordTokenizer("a b c\n")
    assert start_ids(word) == [word.stoi["<eos>"]]
    with pytest.raises(ValueError, match="empty prompt starts after a line end, which the run's"):
        start_ids(CharTokenizer("abc"))


def test_top_k_0_is_off(live):
    model, tok = live
    kwargs = {"max_new_tokens": 12, "seed": 4, "temperature": 2.0}
    off = moa_train.generate(model, tok, "The ", top_k=0, **kwargs)
    assert off == moa_train.generate(model, tok, "The ", **kwargs)
    assert off != moa_train.generate(model, tok, "The ", top_k=1, **kwargs)
    with pytest.raises(ValueError, match="top_k must be >= 0, 0 for off"):
        moa_train.generate(model, tok, "The ", top_k=-1)


@pytest.mark.parametrize("preset", ["mha", "moa_sparse", "moas_dynamic"])
@pytest.mark.parametrize("path", ["cached", "full forwards", "compiled"])
def test_the_sliding_window_goes_on_past_max_seq_len_as_nanogpt_samples(loaded, preset, path):
    """Rows of different lengths pass max_seq_len (16) at different steps; each row is nanoGPT's
    greedy sample: after the limit, a full forward over its last 16 tokens."""
    _, tok = loaded
    model = lively(tok, preset)
    prompts = ["T", "The song was"]
    notes = []
    got = moa_train.generate(
        model,
        tok,
        prompts,
        max_new_tokens=30,
        greedy=True,
        window=True,
        use_cache=path != "full forwards",
        compile="eager" if path == "compiled" else False,
        warn=notes.append,
    )
    for prompt, text in zip(prompts, got, strict=True):
        want = tok.decode(nanogpt_greedy(model, [int(i) for i in tok.encode(prompt)], 30))
        assert text == want and len(text) == 30
    assert any("sliding window on" in n and "'The song was'" in n for n in notes), notes
    off = moa_train.generate(model, tok, prompts, max_new_tokens=30, greedy=True)
    assert [len(t) for t in off] == [16, 5] and off[1] == got[1][:5]


def test_with_the_window_a_long_prompt_keeps_its_last_max_seq_len_tokens(live):
    model, tok = live
    text = "The song was recorded in 1990 by"
    notes = []
    got = moa_train.generate(
        model, tok, text, max_new_tokens=5, greedy=True, window=True, warn=notes.append
    )
    cut = text[-16:]
    assert got == moa_train.generate(model, tok, cut, max_new_tokens=5, greedy=True, window=True)
    assert got[0] == moa_train.generate(model, tok, cut, max_new_tokens=5, greedy=True)
    assert "the sliding window keeps its last 16" in notes[0]
    with pytest.raises(ValueError, match=r"longer than model.max_seq_len=16 .*window=True"):
        moa_train.generate(model, tok, text, max_new_tokens=5)


def test_penalize_is_transformers_repetition_penalty():
    import torch

    from moa_train.generation import penalize

    logits = torch.tensor([[2.0, -2.0, 0.5, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize(logits, seen, 2.0).tolist() == [[1.0, -4.0, 0.5, -1.0]]
    processors = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g)
    ids = torch.randint(0, 40, (3, 12), generator=g)
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter(1, ids, True)
    want = processors.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.equal(penalize(logits, seen, 1.7), want)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_repetition_penalty_counts_the_prompt_and_the_completion(live, use_cache):
    model, tok = live
    ids = [int(i) for i in tok.encode("The song")]
    got = moa_train.generate(
        model,
        tok,
        "The song",
        max_new_tokens=8,
        greedy=True,
        repetition_penalty=3.0,
        use_cache=use_cache,
    )
    assert got == tok.decode(nanogpt_greedy(model, ids, 8, penalty=3.0))
    assert got != moa_train.generate(model, tok, "The song", max_new_tokens=8, greedy=True)


def test_num_samples_gives_that_many_completions_per_prompt(live):
    model, tok = live
    kwargs = {"max_new_tokens": 10, "seed": 0, "temperature": 2.0, "num_samples": 3}
    one = moa_train.generate(model, tok, "The ", **kwargs)
    assert isinstance(one, list) and len(one) == 3 and len(set(one)) == 3
    assert one == moa_train.generate(model, tok, "The ", **kwargs)
    two = moa_train.generate(model, tok, ["The ", "A"], **kwargs)
    assert [len(c) for c in two] == [3, 3] and all(isinstance(s, str) for c in two for s in c)
    with pytest.raises(ValueError, match="num_samples=2 needs sampling"):
        moa_train.generate(model, tok, "The ", greedy=True, num_samples=2)


def test_stop_strings_cut_each_row_and_end_generation_when_all_rows_stopped(live, monkeypatch):
    from moa_train.models.lm import LanguageModel

    model, tok = live
    prompts = ["The ", "In 1"]  # one batch: rows of one budget
    full = moa_train.generate(model, tok, prompts, max_new_tokens=12, greedy=True)
    stops = [full[0][5:7], full[1][3:5]]
    steps, decode_step = [], LanguageModel.decode_step

    def spy(self, tokens, cache, span=None):
        steps.append(span)
        return decode_step(self, tokens, cache, span=span)

    monkeypatch.setattr(LanguageModel, "decode_step", spy)
    got = moa_train.generate(model, tok, prompts, max_new_tokens=12, greedy=True, stop=stops)
    cuts = [min(i for i in (f.find(s) for s in stops) if i >= 0) for f in full]
    assert got == [f[:c] for f, c in zip(full, cuts, strict=True)]
    # the row stopping last held its stop string after `last` tokens (char: one per token); the
    # last drawn token is never fed
    last = max(min(f.find(s) + len(s) for s in stops if s in f) for f in full)
    assert len(steps) == last - 1 < 11
    assert (
        moa_train.generate(model, tok, "The ", max_new_tokens=12, greedy=True, stop="@@")
        == (full[0])
    )
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        moa_train.generate(model, tok, "The ", stop=["a", ""])


def test_streaming_holds_back_what_may_begin_a_stop_string():
    from moa_train.data.tokenizer import CharTokenizer
    from moa_train.generation import _Streamer

    tok = CharTokenizer("abcxz")
    pieces = []
    streamer = _Streamer(tok, pieces.append, ("ab",))
    for prefix in ("x", "xa", "xac", "xaca", "xacab", "xacabzz"):
        streamer([int(i) for i in tok.encode(prefix)], final=prefix.endswith("b"))
    assert pieces == ["x", "ac"]  # "a" held twice; "ab" ends it, and nothing after shows


def test_a_stream_with_a_stop_string_hands_over_the_cut_completion(live):
    model, tok = live
    full = moa_train.generate(model, tok, "The ", max_new_tokens=30, greedy=True)
    pieces = []
    got = moa_train.generate(
        model, tok, "The ", max_new_tokens=30, greedy=True, stop=full[9:11], stream=pieces.append
    )
    assert "".join(pieces) == got == full[: full.find(full[9:11])] and len(pieces) > 1
    with pytest.raises(
        ValueError, match="stream takes one completion: one prompt and num_samples=1"
    ):
        moa_train.generate(model, tok, ["a", "b"], stream=print)


def test_blank_lines_of_a_prompt_file_are_empty_prompts_with_a_note(
    char_run, loaded, tmp_path, capsys
):
    model, tok = loaded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The \n\nIn\n", encoding="utf-8")
    code, out, err = run_cli(
        capsys, char_run, "--prompt-file", prompts, "--max-new-tokens", "4", "--greedy"
    )
    assert code == 0, err
    lines = ["The ", "", "In"]
    completions = moa_train.generate(model, tok, lines, max_new_tokens=4, greedy=True)
    assert out == "".join(f"{p}{c}\n\n" for p, c in zip(lines, completions, strict=True))
    assert len(completions[1]) == 4
    assert err == [
        f"note: --prompt-file {prompts}: line(s) 2 blank: generated from nothing, as empty prompts"
    ]


def test_moa_generate_samples_stops_and_windows(char_run, loaded, capsys):
    model, tok = loaded
    args = (char_run, "--prompt", "The ", "--max-new-tokens", "40", "--device", "cpu")
    code, out, err = run_cli(capsys, *args, "--num-samples", "2", "--seed", "0", "--top-k", "0")
    assert code == 0 and out.count("The ") == 2 and out.endswith("\n\n"), err
    full = moa_train.generate(model, tok, "The ", max_new_tokens=20, greedy=True)
    stop = ["--stop", full[4:6], "--stop", r"@\n"]  # the second never comes
    code, out, err = run_cli(capsys, *args[:4], "20", "--greedy", *stop)
    assert code == 0 and out == "The " + full[: full.find(full[4:6])] + "\n", err
    code, out, err = run_cli(capsys, *args, "--greedy", "--window", "--no-stream")
    assert code == 0 and len(out) == len("The ") + 40 + 1, err
    assert "sliding window on" in err[0]
    code, out, err = run_cli(capsys, *args, "--greedy")
    assert code == 0 and len(out) == len("The ") + 29 + 1 and "sliding window off" in err[0]
    code, out, err = run_cli(capsys, char_run, "--prompt", "", "--max-new-tokens", "3")
    assert code == 0 and len(out) == 3 + 1, err


def test_unescape_reads_newline_tab_and_backslash():
    from moa_train.generation import unescape

    assert unescape(r"a\nb\tc\\n\x") == "a\nb\tc\\n\\x"
