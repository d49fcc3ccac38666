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
    assert "| mha | 4 x 64 |" in md and "| moa_dense | 2 x 64 |" in md
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
