"""scripts/fidelity_checks.py, the source of docs/fidelity.md's figures that no training run gives:
its cheapest section runs and prints a record whose header and figures are sane."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fidelity_checks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fidelity_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dropout_section_prints_a_record_with_the_expected_zero_shares(tmp_path, capsys):
    """Decoder activation dropout null inherits the encoder's 0.2; 0.1 gives 0.1; the encoder stays
    at 0.2 (about 100k positive units a seed: a binomial standard deviation near 0.001)."""
    out = tmp_path / "record.md"
    text = load_script().main(["dropout", "--out", str(out)])
    assert out.read_text() == text and text in capsys.readouterr().out
    assert text.startswith("# Fidelity checks")
    for field in (
        "command: `python scripts/fidelity_checks.py dropout --out",
        "date: ",
        "commit: ",
    ):
        assert f"- {field}" in text
    assert "CPU: " in text
    rows = re.findall(r"^\| (None|0\.1) \| (\d|mean) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert len(rows) == 12  # 5 seeds and a mean for each setting
    for setting, _, decoder, encoder in rows:
        want = 0.2 if setting == "None" else 0.1
        assert float(decoder) == pytest.approx(want, abs=0.006)
        assert float(encoder) == pytest.approx(0.2, abs=0.006)
    # seeded: a second run prints the same figures
    assert load_script().main(["dropout"]).split("## ")[1] == text.split("## ")[1]


def test_an_unknown_section_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["dropuot"])
    assert exit_info.value.code == 2
    assert (
        "unknown section 'dropuot'; valid: dropout, padding, accum, adam" in capsys.readouterr().err
    )
