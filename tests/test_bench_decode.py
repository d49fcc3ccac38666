"""moa-bench --decode on CPU at the tiny size: the measured fields, balanced routing, the KV bytes,
the transformers baseline, the tables rebuilt from the json, and bad input."""

import json
import logging
import os
import sys

import pytest
import torch

from moa_train.bench import decode, main
from moa_train.bench.decode import (
    SIZES,
    balance_routers,
    build,
    hf_baseline,
    prompts,
    routing_shares,
    targets,
)

TINY = SIZES["tiny"]


def table(path) -> str:
    """A written inference.md without the markers of rows measured under contention (this machine
    may be busy): the tables as the tests here check them."""
    return path.read_text().replace(" **[contention]**", "")


def test_decode_bench_measures_every_field(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "results"
    args = [
        "--decode",
        "--decode-size",
        "tiny",
        "--models",
        "mha,moas_dynamic",
        "--no-hf",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads((out / "inference.json").read_text())
    ((rid, run),) = data["runs"].items()
    assert run["bandwidth"] > 0 and run["torch"] == torch.__version__
    assert run["command"].startswith("moa-bench --decode --decode-size tiny")
    assert set(run["contention"]) == {"flagged", "reasons"}
    assert set(data["results"]) == {"tiny/mha", "tiny/moas_dynamic", "tiny/moas_dynamic@top1"}
    n_layer, head_dim = 2, 16  # common.SIZES["tiny"]: 2 layers, d 64, 4 heads; fp32 on a CPU
    for r in data["results"].values():
        assert "error" not in r, r.get("error")
        assert r["run"] == rid
        # mha caches its 4 heads; MoAS every branch's: 4 + gqa_kv_heads (2) + 1
        assert r["kv_heads"] == (4 if r["model"] == "mha" else 7)
        assert r["kv_bytes_per_token"] == 2 * n_layer * r["kv_heads"] * head_dim * 4
        assert r["kv_bytes_per_token_measured"] == r["kv_bytes_per_token"]
        assert r["prefill"]["tokens_per_s"] > 0 and r["prefill"]["batch"] == TINY.prefill_batch
        assert r["contention"]["flagged"] == bool(r["contention"]["reasons"])
        assert set(r["decode"]) == {"1", "4"}
        for batch, d in r["decode"].items():
            assert (
                d["tokens_per_s"] == pytest.approx(int(batch) / d["step_ms"] * 1000)
                and d["tokens_per_s"] > 0
            )
            assert d["mode"].startswith("eager (CPU")
            assert len(d["step_ms_windows"]) == decode.REPS
            assert sorted(d["step_ms_windows"])[1] == pytest.approx(d["step_ms"])
            assert d["kv_bytes_per_token_measured"] == r["kv_bytes_per_token"]
            assert d["bound_ms"] == pytest.approx(1000 * d["read_bytes"] / run["bandwidth"])
            assert d["share_of_bound"] == pytest.approx(d["bound_ms"] / d["step_ms"])
            kv_read = int(batch) * r["kv_bytes_per_token"] * (TINY.prompt_len + TINY.new_tokens / 2)
            assert d["read_bytes"] == pytest.approx(r["param_bytes"] + kv_read)
            target = decode.missed(r["model"], list(r["decode"]).index(batch), d["share_of_bound"])
            # a trace exactly where a target is missed
            assert ("trace" in d) == (target is not None)
            if "trace" in d:
                assert d["trace"]["top"] and d["trace"]["kernel_ms"] > 0
    assert data["results"]["tiny/mha"]["routing"] is None
    assert data["results"]["tiny/moas_dynamic@top1"]["inference_routing"] == "top1"
    routing = data["results"]["tiny/moas_dynamic"]["routing"]
    assert routing["choices"] == ["mha", "gqa", "mqa"] and sum(routing["share"]) == pytest.approx(
        1, abs=1e-3
    )
    assert routing["worst_dev"] < 0.1  # balanced: every layer's shares within 0.1 of a third
    md = (out / "inference.md").read_text()
    assert "| mha | eager (CPU" in table(out / "inference.md")
    assert "| moas_dynamic@top1 |" in table(out / "inference.md") and "## Size tiny" in md
    # the terminal names the top-1 row's figures as such
    batches = [m for m in caplog.messages if " batch " in m and "tok/s" in m]
    assert [m.split(" batch ")[0].strip() for m in batches] == [
        *["tiny/mha"] * 2,
        *["tiny/moas_dynamic"] * 2,
        *["tiny/moas_dynamic@top1"] * 2,
    ]
    assert (
        "tiny/moas_dynamic@top1 (inference_routing=top1: one scheme per token)" in caplog.messages
    )
    assert (out / "inference.png").stat().st_size > 10_000
    (out / "inference.md").unlink()
    assert main(["--decode", "--tables-only", "--out", str(out)]) == 0
    assert (out / "inference.md").read_text() == md


def test_balanced_routing_spreads_a_zero_router():
    """moa_sparse's router starts at zero: every token takes the same experts until it is
    balanced."""
    model, _ = build(TINY, "moa_sparse", torch.device("cpu"))
    idx = prompts(256, TINY.prompt_len, model.vocab_size, "cpu", seed=4)
    before = routing_shares(model, idx)
    # 2 of 8 experts take half of everything each
    assert before["worst_dev"] == pytest.approx(0.5 - 1 / 8)
    balance_routers(model, prompts(256, TINY.prompt_len, model.vocab_size, "cpu", seed=3))
    after = routing_shares(model, idx)
    assert after["of"] == "top-k assignments" and len(after["share"]) == 8
    assert after["worst_dev"] < 0.05


def test_transformers_baseline_runs_on_cpu(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="the baseline needs transformers (extra hf)"
    )
    out = tmp_path / "results"
    assert main(["--decode", "--decode-size", "tiny", "--hf-only", "--out", str(out)]) == 0
    results = json.loads((out / "inference.json").read_text())["results"]
    assert set(results) == {
        f"tiny/hf-llama-kv{kv}/{s}" for kv in (4, 2, 1) for s in ("dynamic", "static")
    }
    for r in results.values():
        assert "error" not in r, r["error"]
        assert r["transformers"] == transformers.__version__
        assert (
            r["config"]["num_key_value_heads"] == r["kv_heads"] and r["config"]["hidden_size"] == 64
        )
        assert (
            r["settings"]["attn_implementation"] == "sdpa"
            and r["settings"]["max_new_tokens"] == TINY.new_tokens
        )
        for d in r["decode"].values():
            # transformers compiles on CUDA only
            assert d["tokens_per_s"] > 0 and d["compiled"] is False
    assert "| llama-kv2 | 2 | static | no/no |" in table(out / "inference.md")


def test_missing_transformers_is_a_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    ((key, row),) = decode.hf_rows(TINY, torch.device("cpu"), ["dynamic"])
    assert key == "tiny/hf" and row["error"].startswith("transformers not importable here")


def test_a_variant_without_the_cache_contract_is_a_row(monkeypatch):
    from moa_train.models.lm import LanguageModel

    monkeypatch.setattr(LanguageModel, "cached_decoding_ok", lambda self: False)
    rows = decode.bench_model("mha", TINY, torch.device("cpu"), 1e10, None)
    assert list(rows) == ["tiny/mha"] and "no KV cache contract" in rows["tiny/mha"]["error"]


def hf_entry(kv, setting, tok_s):
    return {
        "size": "tiny",
        "model": f"llama-kv{kv}",
        "kv_heads": kv,
        "setting": setting,
        "decode": {"1": {"tokens_per_s": tok_s}},
    }


def test_ratios_compare_with_the_same_kv_heads_or_the_mha_equivalent():
    results = {
        "a": hf_entry(4, "dynamic", 10.0),
        "b": hf_entry(4, "static", 40.0),
        "c": hf_entry(1, "dynamic", 20.0),
    }
    assert hf_baseline(results, "tiny", 1, "1") == (20.0, "llama-kv1 dynamic")
    # no 7-head row: the n_head one
    assert hf_baseline(results, "tiny", 7, "1") == (40.0, "llama-kv4 static")
    assert hf_baseline(results, "tiny", 1, "64") == (None, None)


def test_targets_say_by_how_much_they_are_missed():
    def entry(model, share_b1, share_b64, measured=100):
        return {
            "size": "gpt2",
            "model": model,
            "kv_bytes_per_token": 100,
            "kv_bytes_per_token_measured": measured,
            "decode": {"1": {"share_of_bound": share_b1}, "64": {"share_of_bound": share_b64}},
        }

    results = {
        "gpt2/mha": entry("mha", 0.10, 0.6),
        "gpt2/moas_static": entry("moas_static", 0.05, 0.25, 101),
    }
    rows = {t: (m, ok, by) for t, m, ok, by in targets(results)}
    assert rows["mha batch 1: >= 20% of the bandwidth bound"] == (
        "10.0%",
        False,
        "10.0% of the bound (2.0x too slow)",
    )
    assert rows["mha batch 64: >= 50% of the bandwidth bound"] == ("60.0%", True, None)
    assert rows["moas_static batch 64: >= 50% of the bandwidth bound"][1] is False
    assert rows["moas_static: measured KV bytes/token = analytic"][1] is False
    assert rows["mha: measured KV bytes/token = analytic"][1] is True


def test_decode_bench_refuses_unknown_models(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--decode", "--models", "mha,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --models: unknown nope; allowed: mha, gqa") and err.count("\n") == 1
    )


def test_decode_bench_measures_the_head_pool_of_moas_kv(tmp_path):
    """moas_kv (a head pool per layer): allocated bytes per token equal the analytic figure (no
    budget: n_head heads), and the realised bytes are the used slots of balanced routing over
    MHA/GQA/MQA, (4 + 2 + 1) / 3 heads on average."""
    out = tmp_path / "results"
    assert (
        main(
            [
                "--decode",
                "--decode-size",
                "tiny",
                "--models",
                "moas_kv",
                "--no-hf",
                "--no-trace",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads((out / "inference.json").read_text())["results"]["tiny/moas_kv"]
    assert "error" not in r, r.get("error")
    head = 2 * 2 * 16 * 4  # K and V x 2 layers x head_dim 16 x fp32
    assert (
        r["kv_heads"] == 4
        and r["kv_bytes_per_token"] == 4 * head == r["kv_bytes_per_token_measured"]
    )
    assert r["routing"]["choices"] == ["mha", "gqa", "mqa"] and r["routing"]["worst_dev"] < 0.1
    assert r["kv_bytes_per_token_realised"] == pytest.approx(7 / 3 * head, rel=0.2)
    assert "| moas_kv | eager (CPU" in table(out / "inference.md")


def test_decode_spans_cover_every_step_in_buckets():
    assert decode.decode_spans(512, 256, 64) == [(576, 64), (640, 64), (704, 64), (768, 64)]
    # positions 16..19 < 20, 20..23 < 24
    assert decode.decode_spans(16, 8, 5) == [(20, 4), (24, 4)]
    assert decode.decode_spans(16, 8, 64) == [(24, 8)]  # never past the cache
    assert decode.decode_spans(16, 8, 0) == [(None, 8)]  # the whole cache
    for prompt, new, bucket in ((7, 9, 3), (1, 2, 1), (30, 100, 16)):
        spans = decode.decode_spans(prompt, new, bucket)
        assert sum(n for _, n in spans) == new
        pos = prompt
        for span, n in spans:
            assert pos + n - 1 < span <= prompt + new  # every step's position inside its span
            pos += n


@pytest.mark.parametrize("model_name", ["mha", "moas_dynamic", "moas_kv"])
def test_compiled_steps_over_spans_give_the_eager_tokens(model_name):
    """The compiled strategy (models/decoding.Compiled; backend eager here: dynamo's tracing, one
    graph per span) over span buckets and over the whole cache generates what eager steps do, and a
    second call with the same shapes reuses its compiled steps."""
    from moa_train.models.decoding import decode_loop, open_steps

    model, _ = build(TINY, model_name, torch.device("cpu"))
    idx = prompts(2, TINY.prompt_len, model.vocab_size, "cpu", seed=0)
    lengths, max_len = torch.full((2,), TINY.prompt_len), TINY.prompt_len + TINY.new_tokens
    got = []
    with torch.no_grad():
        for compile, bucket in ((False, 0), ("eager", 0), ("eager", 3)):
            for _ in range(2):
                with open_steps(model, 2, max_len, "cpu", compile=compile, span_bucket=bucket) as s:
                    first = s.prefill(idx, lengths)
                    got.append(torch.stack(decode_loop(s, first, TINY.new_tokens, decode.greedy)))
                    assert s.mode == ("compiled" if compile else "cached")
    assert all(torch.equal(g, got[0]) for g in got[1:])
    kept = model.compiled_steps
    assert len(kept) == 2 and all(len(s.runs) >= 1 for s in kept.values())
    assert max(len(s.runs) for s in kept.values()) == len(
        decode.decode_spans(TINY.prompt_len, TINY.new_tokens, 3)
    )


def test_decode_bench_records_its_spans(tmp_path, capsys):
    out = tmp_path / "results"
    assert (
        main(
            [
                "--decode",
                "--decode-size",
                "tiny",
                "--models",
                "mha",
                "--no-hf",
                "--no-trace",
                "--span-bucket",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    d = json.loads((out / "inference.json").read_text())["results"]["tiny/mha"]["decode"]["4"]
    assert d["span_bucket"] == 5 and d["spans"] == [20, 24]
    assert "attends over spans of 5 |" in table(out / "inference.md")
    with pytest.raises(SystemExit) as exc:
        main(["--decode", "--span-bucket", "-1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: --span-bucket: must be 0 (the whole cache) or a positive"
    )


def test_the_committed_tables_rebuild_from_the_committed_json(tmp_path):
    """docs/results/inference.md is what --tables-only makes of docs/results/inference.json (with
    its notes)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "docs/results"
    for name in ("inference.json", "inference_notes.md"):
        (tmp_path / name).write_text((results / name).read_text())
    assert main(["--decode", "--tables-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "inference.md").read_text() == (results / "inference.md").read_text()
    assert "[inference_notes.md](inference_notes.md)" in (tmp_path / "inference.md").read_text()


def test_changing_the_inference_routing_drops_the_compiled_steps():
    """A kept compiled step replays the routing it captured: set_inference_routing drops it, so
    the next compiled generation (the benchmark's top1 row) compiles top1's own."""
    from moa_train.generation import set_inference_routing
    from moa_train.models.decoding import open_steps

    model, _ = build(TINY, "moas_dynamic", torch.device("cpu"))
    with torch.no_grad(), open_steps(model, 1, 8, "cpu", compile="eager") as steps:
        steps.step(steps.prefill(torch.tensor([[1, 2]]), torch.tensor([2])).argmax(-1))
    assert model.compiled_steps and model.cache is not None
    set_inference_routing(model, "top1")
    assert "compiled_steps" not in model.__dict__ and model.cache is None


def test_the_trace_keeps_the_profilers_stderr_out_of_the_terminal(capfd):
    """What is written to stderr during the traced step (torch's profiler writes its own lines
    there from C++) stays out of the terminal, kept in the record; the work of `prepare` (the
    prefill) is not part of the traced step."""
    a = torch.randn(64, 64)

    def prepare():
        torch.mm(a, a)  # untraced

        def step():
            os.write(2, b"profiler noise\n")
            torch.add(a, a)

        return step

    t = decode.trace_step(prepare, torch.device("cpu"), step_ms=1.0)
    assert "profiler noise" not in capfd.readouterr().err
    assert "profiler noise" in t["profiler_stderr"]
    kernels = {k["kernel"] for k in t["top"]}
    assert "aten::add" in kernels and "aten::mm" not in kernels


def test_decode_bench_flags_rows_measured_under_contention(tmp_path, monkeypatch, caplog):
    from test_bench import FELL, fake_probes

    calls = fake_probes(monkeypatch)
    caplog.set_level(logging.WARNING)
    out = tmp_path / "results"
    argv = ["--decode", "--decode-size", "tiny", "--models", "mha", "--no-hf", "--no-trace"]
    assert main([*argv, "--no-paths", "--out", str(out)]) == 0
    assert len(calls) == 2  # the run's probe, then one after the model
    data = json.loads((out / "inference.json").read_text())
    ((rid, run),) = data["runs"].items()
    assert run["bandwidth"] == 100e9 and not run["contention"]["flagged"]
    row = data["results"]["tiny/mha"]
    assert row["contention"]["flagged"] and FELL in row["contention"]["reasons"]
    md = (out / "inference.md").read_text()
    assert "| mha **[contention]** | eager (CPU" in md and f"- tiny/mha: {FELL}" in md
    assert f"| {rid} |" in md
    assert any(
        m.startswith("WARNING: tiny/mha measured under contention") and FELL in m
        for m in caplog.messages
    )
    assert any(m.startswith("WARNING: 1 row(s) of this run flagged") for m in caplog.messages)


def test_a_failed_cli_row_is_reported_not_a_crash(tmp_path, monkeypatch, caplog):
    """--cli whose fresh processes fail (here: its training run) records a row that says so, with
    its size and model, and the tables still build (a row without them crashed the markdown)."""
    monkeypatch.setattr(decode, "cli_row", lambda *a: {"error": "the run for moa-generate failed"})
    with caplog.at_level(logging.WARNING, logger="moa_train"):
        code = main(
            ["--decode", "--decode-size", "tiny", "--hf-only", "--no-hf", "--cli"]
            + ["--out", str(tmp_path)]
        )
    assert code == 0
    row = json.loads((tmp_path / "inference.json").read_text())["results"]["tiny/cli"]
    assert (row["size"], row["model"], row["error"]) == (
        "tiny",
        "cli",
        "the run for moa-generate failed",
    )
    assert "Fresh processes (`--cli`): **failed** in run" in table(tmp_path / "inference.md")
    assert "cli: the run for moa-generate failed" in caplog.text


def test_the_cli_prompt_is_wikitext_valid_text(tmp_path, monkeypatch):
    """--cli's prompt is the longest prefix of the data folder's wikitext-2/valid.txt within the
    prompt length (it once read a file no data folder holds and timed 'the' repeated), and a data
    folder without that file is a row naming it, not a made-up prompt."""
    import subprocess

    words = [f"w{i}" for i in range(100)]
    data = tmp_path / "data"
    (data / "wikitext-2").mkdir(parents=True)
    for name in ("train.txt", "test.txt"):  # the run read them too
        (data / "wikitext-2" / name).write_text("x y z\n")
    (data / "wikitext-2" / "valid.txt").write_text(" ".join(words) + "\n")
    monkeypatch.setenv("MOA_DATA_DIR", str(data))
    # the training run and the timed processes are not what is tested here
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))

    class WordTokenizer:
        vocab_size = 512

        def encode(self, text):
            return text.split()

    monkeypatch.setattr("moa_train.api.load_tokenizer", lambda run: WordTokenizer())
    monkeypatch.setattr(decode, "timed_process", lambda cmd, env: {"error": "not run"})
    work = tmp_path / "work"
    work.mkdir()
    entry = decode.cli_row(TINY, torch.device("cpu"), work)
    assert (work / "cli_words.txt").read_text().split() == words[: TINY.prompt_len]
    assert entry["prompt_tokens"] == TINY.prompt_len

    (data / "wikitext-2" / "valid.txt").unlink()
    entry = decode.cli_row(TINY, torch.device("cpu"), work)
    assert list(entry) == ["error"]
    assert entry["error"].startswith(
        f"the prompt (WikiText-2's valid text): data.root: missing file "
        f"{data / 'wikitext-2' / 'valid.txt'};"
    )


def test_figure_bars_name_their_card_and_run():
    """The figure holds rows of several runs and cards (transformers' rows of each run are kept):
    two rows of one name from different runs get different labels, each naming its card and run."""
    data = {
        "runs": {
            "2026-12-02_01-48-44": {"device": "NVIDIA H200"},
            "2026-12-07_07-32-41": {"device": "NVIDIA H100 80GB HBM3"},
        },
    }
    old = {"model": "llama-kv12", "setting": "static", "run": "2026-12-02_01-48-44"}
    new = {**old, "run": "2026-12-07_07-32-41"}
    mha = {"model": "mha", "run": "2026-12-07_07-32-41"}
    assert decode.bar_label(data, old) == "HF llama-kv12 static (H200, 2026-12-02_01-48)"
    assert decode.bar_label(data, new) == "HF llama-kv12 static (H100, 2026-12-07_07-32)"
    assert decode.bar_label(data, mha) == "mha (H100, 2026-12-07_07-32)"
    # a run the record does not list: said, not guessed
    assert decode.bar_label({}, {**mha, "run": "x"}) == "mha (?, x)"
