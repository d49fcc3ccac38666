"""The Table 1 driver rebuilds its tables from the committed run records (no training)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs/results/runs/moas_table1"


def rebuild(script: str, out: Path) -> dict:
    """`script --tables-only --out out` run as a user would; the rebuilt json's results."""
    subprocess.run(
        [sys.executable, script, "--tables-only", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return json.loads(out.with_suffix(".json").read_text())["results"]


def same_numbers(a, b) -> bool:
    """a == b, floats within 1e-12 relative: a p-value's last digits differ between CPU math
    libraries (the study's json was first written on the GPU machine, its p-values differed there in
    the 16th digit)."""
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=1e-12)
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_numbers(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same_numbers(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


@pytest.mark.skipif(not RECORDS.is_dir(), reason="no committed Table 1 records")
def test_tables_regenerate_from_records(tmp_path):
    out = tmp_path / "table1"
    regenerated = rebuild("scripts/reproduce_moas_table1.py", out)
    committed = json.loads((ROOT / "docs/results/moas_table1.json").read_text())["results"]
    assert regenerated == committed
    for block in regenerated.values():
        for r in block["rows"].values():
            summaries = [
                json.loads((RECORDS / run / "summary.json").read_text()) for run in r["runs"]
            ]
            assert r["val_loss"] == [s["val/loss"] for s in summaries]
            assert len(r["official_valid_loss"]) == len(r["val_loss"]) == 5
    text = out.with_suffix(".md").read_text()
    assert "moas_dynamic" in text and "Welch" in text and "official valid" in text.lower()


@pytest.mark.skipif(
    not (ROOT / "docs/results/runs/translation").is_dir(), reason="no committed translation records"
)
def test_translation_tables_regenerate_from_records(tmp_path):
    from moa_train.results import translation

    out = tmp_path / "translation"
    for name in ("translation.json", "translation_decoding.json"):
        (tmp_path / name).write_text((ROOT / "docs/results" / name).read_text())
    translation.main(["--tables-only", "--out", str(out)])
    committed = json.loads((ROOT / "docs/results/translation.json").read_text())
    assert json.loads(out.with_suffix(".json").read_text()) == committed
    assert out.with_suffix(".md").read_text() == (ROOT / "docs/results/translation.md").read_text()


KV_RECORDS = ROOT / "docs/results/runs/kv_tradeoff"


@pytest.mark.skipif(
    not KV_RECORDS.is_dir(), reason="no committed KV trade-off records (the GPU study)"
)
def test_kv_tradeoff_tables_regenerate_from_records(tmp_path):
    out = tmp_path / "kv_tradeoff"
    # the committed json beside: --tables-only keeps its run facts (date, --jobs) as on the repo's
    # own files
    out.with_suffix(".json").write_text((ROOT / "docs/results/kv_tradeoff.json").read_text())
    regenerated = rebuild("scripts/reproduce_kv_tradeoff.py", out)
    assert same_numbers(
        regenerated, json.loads((ROOT / "docs/results/kv_tradeoff.json").read_text())["results"]
    )
    assert out.with_suffix(".md").read_text() == (ROOT / "docs/results/kv_tradeoff.md").read_text()
    for row, r in regenerated["rows"].items():
        evals = [json.loads((KV_RECORDS / run / "kv_eval.json").read_text()) for run in r["runs"]]
        assert r["test_ppl"] == [e["test/ppl"] for e in evals] and len(evals) >= 3, row
    assert "## Answer" in out.with_suffix(".md").read_text()


def test_same_numbers_tolerates_only_the_last_digits():
    assert same_numbers({"p": [0.014555307120076083, 1, "a"]}, {"p": [0.01455530712007608, 1, "a"]})
    assert not same_numbers({"p": [0.0145553]}, {"p": [0.0145554]})
    assert not same_numbers({"p": 1.0}, {"q": 1.0}) and not same_numbers([1.0], [1.0, 2.0])
    assert not same_numbers({"p": "1.0"}, {"p": 1.0})
