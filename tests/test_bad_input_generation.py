"""Generation inputs that do not fit the run (issue 28): a tokenizer.json that is not the one the
checkpoint was trained with (refused in one line naming both files; checkpoints from before the
tokenizer was recorded: checked by vocabulary size, with a note), a tokenizer.json that does not
read, prompts that are not UTF-8, a temperature so small it overflows the logits, and a vocabulary
padded past the tokenizer's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import moa_train
from conftest import REPO

RUN = ("model=mha", "trainer.max_steps=4", "trainer.eval_interval=4")
ARGS = ("--max-new-tokens", "5", "--device", "cpu")


@pytest.fixture(scope="module")
def char_run(train_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("char_run")
    train_run(run_dir, *RUN)
    return run_dir


@pytest.fixture(scope="module")
def checkpoint(char_run):
    return sorted((char_run / "checkpoints").glob("step_*.pt"))[-1]


@pytest.fixture(scope="module")
def model(checkpoint):
    from moa_train.api import load_checkpoint_model

    return load_checkpoint_model(checkpoint)[0]


@pytest.fixture(scope="module")
def symbols(char_run):
    return json.loads((char_run / "tokenizer.json").read_text(encoding="utf-8"))["symbols"]


def char_folder(parent, name: str, symbols: list):
    """A folder holding only a char tokenizer.json of these symbols (a RUN_DIR for --checkpoint)."""
    folder = parent / name
    folder.mkdir()
    text = json.dumps({"kind": "char", "symbols": symbols}, ensure_ascii=False)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    return folder


def swapped(symbols: list) -> list:
    """The same vocabulary, two ids exchanged ('e' and 'a'): same size, other ids."""
    out = list(symbols)
    i, j = out.index("e"), out.index("a")
    out[i], out[j] = out[j], out[i]
    return out


def without_tokenizer_record(char_run, checkpoint, folder):
    """A copy of the run, its checkpoint as written before checkpoints recorded the tokenizer."""
    from moa_train.train.checkpoint import atomic_save

    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(char_run / "tokenizer.json", folder / "tokenizer.json")
    state = torch.load(checkpoint, weights_only=True)
    state.pop("tokenizer", None)
    state.pop("checkpoint_format", None)  # written before checkpoints were versioned, too
    atomic_save(state, folder / "checkpoints" / checkpoint.name)
    return folder


def run_cli(capsys, *args) -> tuple:
    """(exit code, stdout, stderr lines) of `moa-generate ARGS` in-process."""
    from moa_train.generation import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as stopped:
        code = stopped.code
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


def assert_one_line(result, *words):
    code, out, err = result
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: "), result
    for word in words:
        assert str(word) in err[0], err[0]


# --- the tokenizer the checkpoint was trained with ------------------------------------------------


def test_a_checkpoint_records_its_tokenizer(char_run, checkpoint, symbols):
    from moa_train.data.tokenizer import tokenizer_identity

    state = torch.load(checkpoint, weights_only=True)
    raw = (char_run / "tokenizer.json").read_bytes()
    assert state["tokenizer"] == tokenizer_identity(raw, len(symbols))
    assert state["tokenizer"]["vocab_size"] == state["vocab_size"]


@pytest.mark.parametrize("case", ["permuted", "smaller"])
def test_another_tokenizer_is_refused_naming_both_files(case, model, checkpoint, symbols, tmp_path):
    """A permuted vocabulary of the same size gave garbage silently; a smaller one an IndexError
    (or garbage)."""
    other = swapped(symbols) if case == "permuted" else symbols[:-5]
    folder = char_folder(tmp_path, case, other)
    tok = moa_train.load_tokenizer(folder)
    with pytest.raises(ValueError, match="is not the tokenizer") as err:
        moa_train.generate(model, tok, ["The "], max_new_tokens=5, greedy=True)
    message = str(err.value)
    assert str(folder / "tokenizer.json") in message and str(checkpoint) in message
    assert "\n" not in message


def test_moa_generate_refuses_another_tokenizer_in_one_line(checkpoint, symbols, tmp_path, capsys):
    folder = char_folder(tmp_path, "permuted", swapped(symbols))
    result = run_cli(capsys, folder, "--checkpoint", checkpoint, "--prompt", "The ", *ARGS)
    assert_one_line(result, folder / "tokenizer.json", checkpoint, "is not the tokenizer")


def test_a_checkpoint_without_a_record_checks_the_vocabulary_size_with_a_note(
    char_run, checkpoint, symbols, tmp_path
):
    from moa_train.api import load_checkpoint_model

    old = without_tokenizer_record(char_run, checkpoint, tmp_path / "old")
    model, _, path = load_checkpoint_model(old)
    notes = []
    out = moa_train.generate(
        model,
        moa_train.load_tokenizer(old),
        ["The "],
        max_new_tokens=5,
        greedy=True,
        warn=notes.append,
    )
    assert len(out[0]) == 5
    assert len(notes) == 1 and str(path) in notes[0] and "could not be verified" in notes[0]
    smaller = moa_train.load_tokenizer(char_folder(tmp_path, "smaller", symbols[:-5]))
    with pytest.raises(ValueError, match=f"holds {len(symbols) - 5} symbols but .* has"):
        moa_train.generate(model, smaller, ["The "], max_new_tokens=5, greedy=True)


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"kind": "char", "symbols": ["a", ', "is not valid JSON"),
        (b'{"kind": "char", "symbols": ["caf\xe9"]}', "must be UTF-8 text: line 1, byte offset 33"),
        (b'{"model": {"type": "BPE", "vocab": 3}}', "is not a tokenizers BPE file"),
        (b'{"kind": "word"}', "a word vocabulary needs 'symbols'"),
    ],
    ids=["invalid JSON", "not UTF-8", "not a BPE file", "no symbols"],
)
def test_a_tokenizer_file_that_does_not_read_is_one_line_naming_it(content, words, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=words) as err:
        moa_train.load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)


def test_moa_generate_names_a_tokenizer_file_of_invalid_json(checkpoint, tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    result = run_cli(capsys, tmp_path, "--checkpoint", checkpoint, "--prompt", "The ", *ARGS)
    assert_one_line(result, tmp_path / "tokenizer.json", "is not valid JSON")


# --- prompts that are not UTF-8 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_run(checkpoint, wikitext_texts, tmp_path_factory):
    """A run folder of a (tiny, untrained) model of a byte-level BPE vocabulary."""
    from omegaconf import OmegaConf

    from moa_train.data.corpus import train_bpe
    from moa_train.models import build_model
    from moa_train.train.checkpoint import atomic_save

    folder = tmp_path_factory.mktemp("bpe_run")
    (folder / "checkpoints").mkdir()
    lines = wikitext_texts["train"].splitlines(keepends=True)[:300]
    vocab = train_bpe(lines, 300, folder / "tokenizer.json").get_vocab_size()
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = build_model(OmegaConf.create(state["config"]).model, vocab).state_dict()
    state["vocab_size"] = vocab
    raw = (folder / "tokenizer.json").read_bytes()
    state["tokenizer"] = {"sha256": hashlib.sha256(raw).hexdigest(), "vocab_size": vocab}
    atomic_save(state, folder / "checkpoints" / checkpoint.name)
    return folder


def test_a_prompt_with_an_undecodable_byte_is_refused_by_the_bpe_api(bpe_run):
    from moa_train.generation import encode_prompt

    tok = moa_train.load_tokenizer(bpe_run)
    assert tok.kind == "bpe"
    with pytest.raises(ValueError, match=r"character 4 .* a prompt must be valid UTF-8"):
        encode_prompt(tok, "The \udcff", 32)  # how Python hands over argv's byte 0xff


def test_moa_generate_refuses_a_prompt_of_invalid_utf8_bytes(bpe_run):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "moa_train.generation", bpe_run, "--prompt", b"The \xff", *ARGS],
        capture_output=True,
        env=env,
        timeout=120,
    )
    err = [line for line in out.stderr.decode(errors="replace").splitlines() if line.strip()]
    assert out.returncode == 2 and out.stdout == b"" and len(err) == 1, (out.returncode, err)
    assert err[0] == "error: --prompt must be UTF-8 text: line 1, byte offset 4 (0xff) is not"


def test_moa_generate_refuses_a_latin1_prompt_file_naming_line_and_offset(
    char_run, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("The \nCafé au lait\n".encode("latin-1"))
    result = run_cli(capsys, char_run, "--prompt-file", prompts, *ARGS)
    assert_one_line(
        result, f"--prompt-file {prompts} must be UTF-8 text: line 2, byte offset 8 (0xe9) is not"
    )


# --- sampling -------------------------------------------------------------------------------------


def test_a_tiny_temperature_samples_the_most_likely_tokens_instead_of_nan():
    """1e-45 overflowed logits / temperature to inf (nan in the softmax: a RuntimeError); 5e-324
    rounds to 0 in float32. Below MIN_TEMPERATURE a temperature acts as it: greedy, ties shared."""
    from moa_train.generation import pick

    logits = torch.tensor([[30.0, 30.0, -1e30, 29.9], [-5.0, 7.0, 6.99, 0.0]]).repeat(50, 1)
    gen = torch.Generator().manual_seed(0)
    for temperature in (1e-45, 5e-324):
        drawn = pick(logits, temperature, None, None, False, gen).view(50, 2)
        assert set(drawn[:, 0].tolist()) == {0, 1} and set(drawn[:, 1].tolist()) == {1}


def test_generate_and_moa_generate_take_a_temperature_of_1e_45(char_run, model, capsys):
    tok = moa_train.load_tokenizer(char_run)
    greedy = moa_train.generate(model, tok, ["The "], max_new_tokens=5, greedy=True)
    assert moa_train.generate(model, tok, ["The "], max_new_tokens=5, temperature=1e-45) == greedy
    code, out, err = run_cli(capsys, char_run, "--prompt", "The ", "--temperature", "1e-45", *ARGS)
    assert code == 0 and out == f"The {greedy[0]}\n", (code, err)


def test_a_vocabulary_padded_past_the_tokenizer_draws_the_tokenizers_ids_only(char_run):
    """model.vocab_size above the tokenizer's: the extra ids have no symbol (an IndexError in
    decode when one was drawn)."""
    from omegaconf import OmegaConf

    from moa_train import config
    from moa_train.models.lm import LanguageModel

    tok = moa_train.load_tokenizer(char_run)
    padded = tok.vocab_size + 64
    m = OmegaConf.structured(
        config.VARIANTS["mha"](
            name="mha", d_model=16, n_layer=1, n_head=2, max_seq_len=64, vocab_size=padded
        )
    )
    torch.manual_seed(0)
    model = LanguageModel(m, padded).eval()
    (out,) = moa_train.generate(model, tok, ["The "], max_new_tokens=40, temperature=50.0, seed=0)
    assert len(out) == 40


# --- issue 29: the new options' refusals ----------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--num-samples", "0"), "--num-samples must be >= 1 (got 0)"),
        (("--num-samples", "2", "--greedy"), "--num-samples=2 needs sampling"),
        (("--repetition-penalty", "0"), "--repetition-penalty must be > 0, 1 for off (got 0.0)"),
        (("--top-k", "-1"), "--top-k must be >= 0, 0 for off (got -1)"),
        (("--stop", ""), "--stop strings must be non-empty str (got '')"),
        (("--stream", "--num-samples", "2"), "--stream prints one completion as it comes"),
    ],
    ids=["no samples", "greedy samples", "penalty 0", "negative top-k", "empty stop", "stream 2"],
)
def test_moa_generate_refuses_bad_new_options_in_one_line(char_run, extra, words, capsys):
    assert_one_line(run_cli(capsys, char_run, "--prompt", "The ", *ARGS, *extra), words)


def test_moa_generate_takes_an_empty_prompt_and_top_k_0(char_run, model, capsys):
    """transformers reads them as no prompt and no top-k; both were refused."""
    tok = moa_train.load_tokenizer(char_run)
    want = moa_train.generate(model, tok, "", max_new_tokens=5, seed=0)
    code, out, err = run_cli(capsys, char_run, "--prompt", "", "--top-k", "0", "--seed", "0", *ARGS)
    assert code == 0 and out == want + "\n", (code, err)
