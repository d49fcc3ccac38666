"""The successors (mae, moh, mla, switchhead) with rotary positions through the three user commands:
moa-train trains one, moa-generate decodes from its run folder (the cache and full forwards give
the same greedy text), moa-bench times its training step and its decoding."""

from __future__ import annotations

import json

import pytest

from conftest import read_jsonl

SUCCESSORS = ("mae", "moh", "mla", "switchhead")


def generate(capsys, run_dir, *args) -> tuple:
    """(exit code, stdout) of `moa-generate RUN_DIR ARGS` in-process."""
    from moa_train.generation import main

    code = 0
    try:
        main([str(run_dir), *map(str, args)])
    except SystemExit as stopped:
        code = stopped.code or 0
    return code, capsys.readouterr().out


@pytest.mark.parametrize("variant", SUCCESSORS)
def test_trains_and_generates_from_the_cli_with_rotary_positions(variant, cli, capsys, tmp_path):
    code, out, _ = cli(f"model={variant}", "model.positions=rope", "trainer.max_steps=6")
    assert code == 0, out
    run = tmp_path / "run"
    config = (run / ".hydra" / "config.yaml").read_text()
    assert f"name: {variant}" in config and "positions: rope" in config
    assert any("train/loss" in r for r in read_jsonl(run / "metrics.jsonl"))
    capsys.readouterr()
    common = ("--prompt", "The ", "--max-new-tokens", "12", "--greedy", "--device", "cpu")
    cached = generate(capsys, run, *common)
    full = generate(capsys, run, *common, "--no-cache")
    assert cached[0] == 0 and full[0] == 0, (cached, full)
    assert cached[1].startswith("The ") and len(cached[1].rstrip("\n")) > len("The ")
    assert cached[1] == full[1]


@pytest.mark.slow
@pytest.mark.parametrize("decode", [False, True], ids=["train", "decode"])
def test_every_successor_is_a_moa_bench_row(decode, tmp_path):
    from moa_train.bench import main

    out = tmp_path / "results"
    models = ",".join(SUCCESSORS)
    if decode:
        argv = ["--decode", "--models", models, "--decode-size", "tiny", "--no-hf", "--no-trace"]
        argv += ["--no-paths", "--new-tokens", "4", "--out", str(out)]
    else:
        argv = ["--sizes", "tiny", "--models", models, "--steps", "2", "--windows", "1"]
        argv += ["--no-profile", "--no-checks", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / ("inference.json" if decode else "bench.json")).read_text())
    rows = results["results"]
    for variant in SUCCESSORS:
        keys = [k for k in rows if k.split("/")[1].split("@")[0].startswith(variant)]
        assert keys, (variant, sorted(rows))
        row = rows[keys[0]]
        if decode:  # the cached decode measured, its cache what the variant's layout says
            assert row["decode"] and row["kv_bytes_per_token_measured"] > 0, row
        else:
            assert row["step_ms"] > 0 and row["flops_per_token"] > 0, row
