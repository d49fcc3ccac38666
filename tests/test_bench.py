"""moa-bench on CPU at the tiny size: the measured fields, the merge of runs into one file, the
tables."""

import json

import pytest

from moa_train.bench import main
from moa_train.bench.train import targets


@pytest.mark.slow
def test_bench_measures_and_merges(tmp_path, monkeypatch):
    out = tmp_path / "results"
    args = ["--sizes", "tiny", "--steps", "2", "--windows", "2", "--out", str(out), "--no-checks"]
    assert main([*args, "--models", "mha,moa_sparse"]) == 0
    assert main([*args, "--models", "moa_dense", "--batch", "2"]) == 0
    bench = json.loads((out / "bench.json").read_text())
    assert len(bench["runs"]) == 2
    assert set(bench["results"]) == {"tiny/mha", "tiny/moa_sparse", "tiny/moa_dense"}
    for r in bench["results"].values():
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(
            r["batch"] * r["block"] / r["step_ms"] * 1000
        )
        assert 0 < r["mfu"] < 1 and r["step_ms_fixed_batch"] > 0 and r["data_wait_share"] < 1
        assert r["run"] in bench["runs"]
    assert bench["results"]["tiny/moa_dense"]["batch"] == 2
    # dense moa computes all 8 experts' Q and O, so its FLOPs per token exceed the sparse k=2
    # model's
    flops = {
        name: bench["results"][f"tiny/{name}"]["flops_per_token"]
        for name in ("moa_dense", "moa_sparse")
    }
    assert flops["moa_dense"] > flops["moa_sparse"]
    md = (out / "bench.md").read_text()
    # without the marker of a row measured on a busy machine (this one may be)
    rows = md.replace(" **[contention]**", "")
    assert "| mha | 4 x 64 |" in rows and "| moa_dense | 2 x 64 |" in rows
    md_before = md
    (out / "bench.md").unlink()
    assert main(["--tables-only", "--out", str(out)]) == 0
    assert (out / "bench.md").read_text() == md_before


def test_bench_refuses_unknown_models(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--models", "mha,nope"])
    assert exc.value.code == 2
    assert "--models: unknown nope; allowed: mha, gqa" in capsys.readouterr().err


def entry(size, model, step_ms, flops, mfu=0.5, wait=0.001):
    return {
        "size": size,
        "model": model,
        "step_ms": step_ms,
        "flops_per_token": flops,
        "mfu": mfu,
        "tokens_per_s": 1000 / step_ms,
        "data_wait_share": wait,
    }


def test_targets_compare_time_ratios_with_flop_ratios():
    results = {
        "table1/mha": entry("table1", "mha", 1.0, 100),
        "table1/moas_static": entry("table1", "moas_static", 1.7, 150),
        "gpt2/mha": entry("gpt2", "mha", 10, 100, mfu=0.56),
        "gpt2/moa_sparse": entry("gpt2", "moa_sparse", 5, 50),
        "gpt2/moa_dense": entry("gpt2", "moa_dense", 4, 80, wait=0.03),
    }
    rows = {t: (m, ok) for t, m, ok in targets(results)}
    assert rows["GPT-2 small mha: MFU >= 55%"] == ("56.0%", True)
    assert rows["Table 1 size moas_static: time ratio <= 1.15 x FLOP ratio (1.72)"] == (
        "1.70 (FLOPs 1.50)",
        True,
    )
    assert rows["GPT-2 small moa_sparse faster per token than moa_dense"] == ("0.80x", False)
    assert rows["data wait < 2% of the step (worst model)"] == ("3.00%", False)


def test_committed_bench_tables_rebuild_from_their_json():
    """docs/results/bench.md is what moa-bench writes from bench.json and the notes: no figure
    edited by hand."""
    from conftest import REPO
    from moa_train.bench.common import load
    from moa_train.bench.train import markdown

    out = REPO / "docs" / "results"
    bench = load(out / "bench.json")
    assert bench["results"], "no committed bench results"
    assert markdown(bench, (out / "bench_notes.md").read_text()) == (out / "bench.md").read_text()


@pytest.mark.slow
def test_bench_runs_moas_kv_at_the_tiny_size(tmp_path):
    """Every registered variant is a moa-bench row (config.bench_presets): moas_kv trains in fast
    mode too."""
    out = tmp_path / "results"
    assert (
        main(
            [
                "--sizes",
                "tiny",
                "--models",
                "moas_kv",
                "--steps",
                "2",
                "--windows",
                "2",
                "--out",
                str(out),
                "--no-checks",
            ]
        )
        == 0
    )
    r = json.loads((out / "bench.json").read_text())["results"]["tiny/moas_kv"]
    assert r["step_ms"] > 0 and r["flops_per_token"] > 0


# --- where results go -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, files", [([], "bench.md"), (["--decode"], "inference.md")], ids=["train", "decode"]
)
def test_results_go_to_outputs_unless_published(argv, files, tmp_path, monkeypatch):
    """Without --out or --publish a benchmark writes under outputs/bench/ of the working directory,
    never into the committed docs/results/."""
    from conftest import REPO

    monkeypatch.chdir(tmp_path)
    committed = (REPO / "docs" / "results" / files).read_text()
    assert main([*argv, "--tables-only"]) == 0
    assert (tmp_path / "outputs" / "bench" / files).is_file()
    assert not (tmp_path / "docs").exists()
    assert (REPO / "docs" / "results" / files).read_text() == committed


def test_publish_names_the_checkouts_results_folder():
    from conftest import REPO
    from moa_train.bench import decode, train
    from moa_train.bench.common import DEFAULT_OUT, out_dir

    published = REPO / "docs" / "results"
    assert out_dir(train.parse_args(["--publish"])) == published
    assert out_dir(decode.parse_args(["--publish"])) == published
    assert out_dir(train.parse_args([])) == DEFAULT_OUT == out_dir(decode.parse_args([]))
    assert out_dir(decode.parse_args(["--out", "x/y"])).as_posix() == "x/y"


@pytest.mark.parametrize("argv", [[], ["--decode"]], ids=["train", "decode"])
def test_publish_and_out_together_is_a_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--publish", "--out", "somewhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --out: not allowed with argument --publish") and err.count("\n") == 1
    )


# --- contention -----------------------------------------------------------------------------------


def test_contention_flags_a_slow_copy_against_the_cards_class():
    from moa_train.bench.common import contention

    h100 = "NVIDIA H100 80GB HBM3"
    assert contention("cuda", h100, bandwidth=2.96e12) == {"flagged": False, "reasons": []}
    busy = contention("cuda", h100, bandwidth=5e9)
    assert busy["flagged"]
    assert busy["reasons"] == ["copy bandwidth 5 GB/s, below the 1,500 GB/s of an idle H100"]
    # H200's floor, not H100's; a card of no known class has none
    assert contention("cuda", "NVIDIA H200", bandwidth=1.8e12)["flagged"]
    assert not contention("cuda", "NVIDIA H100 PCIe", bandwidth=1.8e12)["flagged"]
    assert not contention("cuda", "Some GPU", bandwidth=5e9)["flagged"]
    # a CPU: no floor, but a probe slower than the run's first one
    assert not contention("cpu", "cpu (16 threads)", bandwidth=5e9)["flagged"]
    fell = contention("cpu", "cpu", bandwidth=5e9, first_bandwidth=104e9)
    assert fell["reasons"] == [
        "copy bandwidth fell to 5.0 GB/s from 104.0 GB/s at the start of the run"
    ]
    assert not contention("cpu", "cpu", bandwidth=90e9, first_bandwidth=104e9)["flagged"]


def test_contention_flags_spread_windows_negative_gaps_and_load():
    from moa_train.bench.common import contention

    quiet = contention(
        "cuda",
        "NVIDIA H100",
        windows={"step windows": [10.0, 10.4, 10.1]},
        gaps={"trace b1": (0.05, 0.5)},
    )
    assert quiet == {"flagged": False, "reasons": []}
    spread = contention("cuda", "NVIDIA H100", windows={"step windows": [10.0, 14.0, 10.1]})
    assert spread["reasons"] == ["step windows spread 1.40x (max / min > 1.3)"]
    # a CPU's timings may scatter more before they count
    assert not contention("cpu", "cpu", windows={"step windows": [10.0, 14.0]})["flagged"]
    assert contention("cpu", "cpu", windows={"w": [10.0, 25.0]})["flagged"]
    gaps = contention("cpu", "cpu", gaps={"trace b1": (-53.874, 12.5), "trace b4": (-1.0, 12.5)})
    assert gaps["reasons"] == [
        "trace b1: gaps -53.874 ms in a 12.500 ms step (kernels longer than the step)"
    ]
    assert contention("cpu", "cpu", load=7.0, cores=4)["reasons"] == [
        "load average 7.0 on 4 cores at the start"
    ]
    assert not contention("cpu", "cpu", load=3.9, cores=4)["flagged"]


def test_contention_records_merge_their_reasons_once():
    from moa_train.bench.common import merge

    run = {"flagged": True, "reasons": ["a"]}
    row = {"flagged": True, "reasons": ["a", "b"]}
    assert merge(run, None, row) == {"flagged": True, "reasons": ["a", "b"]}
    assert merge({"flagged": False, "reasons": []}, None) == {"flagged": False, "reasons": []}


def fake_probes(monkeypatch):
    """The copy probe made to report an idle machine first (100 GB/s) and a busy one (5 GB/s)
    after, whatever this machine is doing."""
    from moa_train.bench import common

    calls = []

    def copy_bandwidth(device, nbytes, reps=10):
        calls.append(nbytes)
        return (100e9 if len(calls) == 1 else 5e9), [0.01] * reps

    monkeypatch.setattr(common, "copy_bandwidth", copy_bandwidth)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return calls


FELL = "copy bandwidth fell to 5.0 GB/s from 100.0 GB/s at the start of the run"


@pytest.mark.slow
def test_bench_flags_rows_measured_under_contention(tmp_path, monkeypatch, caplog):
    import logging

    calls = fake_probes(monkeypatch)
    caplog.set_level(logging.WARNING)
    out = tmp_path / "results"
    args = ["--sizes", "tiny", "--models", "mha", "--steps", "1", "--windows", "2", "--no-checks"]
    assert main([*args, "--out", str(out)]) == 0
    assert len(calls) == 2  # the run's probe, then one after the model
    bench = json.loads((out / "bench.json").read_text())
    ((rid, run),) = bench["runs"].items()
    assert run["bandwidth"] == 100e9 and run["contention"] == {"flagged": False, "reasons": []}
    row = bench["results"]["tiny/mha"]
    assert row["contention"]["flagged"] and FELL in row["contention"]["reasons"]
    md = (out / "bench.md").read_text()
    assert "| mha **[contention]** | 4 x 64 |" in md and f"- tiny/mha: {FELL}" in md
    assert f"| {rid} |" in md  # the run itself was not flagged
    assert any(
        m.startswith("WARNING: tiny/mha measured under contention") and FELL in m
        for m in caplog.messages
    )
