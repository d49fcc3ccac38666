"""moa-report on a fixture of run folders: the grouped table's values, CSV, PNGs that open, the HTML page."""
import csv
import statistics

import pytest


@pytest.fixture(scope="module")
def runs(train_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    summaries = {}
    for model, seed in (("mha", 0), ("mha", 1), ("moa", 0)):
        run = root / f"{model}-{seed}"
        (run / ".hydra").mkdir(parents=True)
        summary, _ = train_run(run, f"model={model}", "model.n_head=4", f"trainer.seed={seed}")
        from conftest import compose_train  # the composed config, as Hydra would have saved it
        from omegaconf import OmegaConf
        OmegaConf.save(compose_train("debug=tiny", f"model={model}", f"trainer.seed={seed}"),
                       run / ".hydra" / "config.yaml")
        summaries.setdefault(model, []).append(summary)
    return root, summaries


def test_report_table_plots_and_html(runs, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from moa_train.report import main

    root, summaries = runs
    out = tmp_path / "report"
    main([str(root), "--out", str(out)])
    rows = {r["model.name"]: r for r in csv.DictReader(open(out / "report.csv"))}
    assert set(rows) == {"mha", "moa"}
    assert rows["mha"]["runs"] == "2"
    mha_losses = [s["val/loss"] for s in summaries["mha"]]
    assert float(rows["mha"]["val/loss"]) == pytest.approx(statistics.mean(mha_losses))
    assert float(rows["mha"]["val/loss std"]) == pytest.approx(statistics.stdev(mha_losses))
    assert float(rows["moa"]["val/loss"]) == pytest.approx(summaries["moa"][0]["val/loss"])
    for name in ("val_loss.png", "routing_entropy.png", "utilisation_0.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 50 and image.shape[1] > 50
    page = (out / "report.html").read_text()
    assert 'src="val_loss.png"' in page and 'src="utilisation_0.png"' in page and "mha" in page
    md = (out / "report.md").read_text()
    assert "routing at the last logged step" in md and "moa (moa-0)" in md


def test_report_without_runs_is_an_error(tmp_path):
    from moa_train.report import main

    with pytest.raises(SystemExit, match="no run folder"):
        main([str(tmp_path)])
