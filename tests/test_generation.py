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
    from moa_train.data.wikitext import WordTokenizer, tokenizer_from_json, tokenizer_json
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
    from moa_train.data.wikitext import tokenizer_from_json

    tok = tokenizer_from_json(again.tokenizer_file.read_text(encoding="utf-8"))
    assert tok.kind == "word" and tok.vocab_size == again.vocab_size


def test_a_bpe_runs_tokenizer_file_loads_and_round_trips(make_cfg, wikitext_texts):
    from moa_train.data import load_data
    from moa_train.data.wikitext import tokenizer_from_json

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
