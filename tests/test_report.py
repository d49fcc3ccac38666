"""moa-report on a fixture of run folders: the grouped table's values, CSV, PNGs that open, the HTML
page with real tables and captions, run names from the overrides, the heatmap's fixed scale and the
entropy plot's ln C."""

import csv
import math
import statistics
from html.parser import HTMLParser

import pytest

LABELS = ["model=mha trainer.seed=0", "model=mha trainer.seed=1", "model=moa trainer.seed=0"]


@pytest.fixture(scope="module")
def runs(train_run, tmp_path_factory):
    from omegaconf import OmegaConf

    from conftest import compose_train  # the composed config, as Hydra would have saved it

    root = tmp_path_factory.mktemp("runs")
    summaries = {}
    for job, (model, seed) in enumerate((("mha", 0), ("mha", 1), ("moa", 0))):
        run = root / str(job)  # numbered like a multirun's job folders
        (run / ".hydra").mkdir(parents=True)
        summary, _ = train_run(run, f"model={model}", "model.n_head=4", f"trainer.seed={seed}")
        overrides = ["debug=tiny", f"model={model}", f"trainer.seed={seed}"]
        OmegaConf.save(compose_train(*overrides), run / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
        summaries.setdefault(model, []).append(summary)
    return root, summaries


class Page(HTMLParser):
    """The tags of a page, and the text inside each th, td, figcaption and pre."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.text, self.open = [], {}, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag) :]

    def handle_data(self, data):
        for tag in ("th", "td", "figcaption", "pre"):
            if tag in self.open:
                self.text.setdefault(tag, []).append(data)

    def count(self, tag: str) -> int:
        return sum(t == tag for t, _ in self.tags)


def records_of(root):
    from moa_train.report import find_runs, load_run_record, run_labels

    records = [load_run_record(r) for r in find_runs([root])]
    for record, label in zip(records, run_labels(records), strict=True):
        record["label"] = label
    return records


def test_report_table_plots_and_html(runs, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from moa_train.report import main

    root, summaries = runs
    out = tmp_path / "report"
    main([str(root), "--out", str(out)])
    with open(out / "report.csv") as f:
        rows = {r["model.name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"mha", "moa"}
    assert rows["mha"]["runs"] == "2"
    mha_losses = [s["val/loss"] for s in summaries["mha"]]
    assert float(rows["mha"]["val/loss"]) == pytest.approx(statistics.mean(mha_losses))
    assert float(rows["mha"]["val/loss std"]) == pytest.approx(statistics.stdev(mha_losses))
    assert float(rows["moa"]["val/loss"]) == pytest.approx(summaries["moa"][0]["val/loss"])
    for name in ("val_loss.png", "routing_entropy.png", "utilisation_0.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 50 and image.shape[1] > 50

    page = Page((out / "report.html").read_text())
    # grouped, runs, routing; no Markdown in <pre>
    assert page.count("table") == 3 and "pre" not in page.text
    assert "|---" not in (out / "report.html").read_text()
    assert {"model.name", "runs", "val/loss", "entropy (nats)", "max ln C"} <= set(page.text["th"])
    cells = set(page.text["td"])
    assert {
        "mha",
        "moa",
        *LABELS,
        f"{statistics.mean(mha_losses):.4f} ± {statistics.stdev(mha_losses):.4f}",
    } <= cells
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert images == ["val_loss.png", "routing_entropy.png", "utilisation_0.png"]
    captions = page.text["figcaption"]
    assert len(captions) == len(images) and all(len(c) > 60 and ".png" not in c for c in captions)
    assert "ln C" in captions[1] and "0..1" in captions[2] and LABELS[2] in captions[2]
    md = (out / "report.md").read_text()
    assert "Routing at the last logged step" in md and LABELS[2] in md


def test_html_table_escapes_cells():
    from moa_train.report import html_table

    page = Page(html_table(["a<b"], [["<script>x & y</script>"]], "1 < 2"))
    assert page.text["th"] == ["a<b"] and page.text["td"] == ["<script>x & y</script>"]
    assert page.count("script") == 0 and page.count("table") == 1


def test_runs_are_named_by_the_overrides_they_do_not_share(runs):
    pytest.importorskip("matplotlib")
    from moa_train.report import common_overrides, entropy_figure, val_loss_figure

    records = records_of(runs[0])
    assert [r["label"] for r in records] == LABELS
    assert common_overrides(records) == ["debug=tiny"]
    legend = val_loss_figure(records).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == LABELS
    routed = [r for r in records if r["routing"]]
    legend = entropy_figure(routed).legends[0]
    assert [t.get_text() for t in legend.get_texts()] == LABELS[2:]


def test_utilisation_heatmap_has_a_fixed_scale_and_its_values_in_the_cells():
    pytest.importorskip("matplotlib")
    from moa_train.report import utilisation_figure

    routing = {
        "routing/util/layer0/mha": 0.25,
        "routing/util/layer0/gqa": 0.35,
        "routing/util/layer0/mqa": 0.4,
        "routing/util/layer1/mha": 0.3,
        "routing/util/layer1/gqa": 0.3,
        "routing/util/layer1/mqa": 0.4,
    }
    ax = utilisation_figure(routing, "t").axes[0]
    # not the data's 0.25..0.4: heatmaps of runs compare
    assert ax.images[0].get_clim() == (0.0, 1.0)
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    assert cells == {
        (0, 0): "0.25",
        (0, 1): "0.35",
        (0, 2): "0.40",
        (1, 0): "0.30",
        (1, 1): "0.30",
        (1, 2): "0.40",
    }
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mha", "gqa", "mqa"]


def test_entropy_plot_marks_the_maximum_ln_c_of_each_site():
    pytest.importorskip("matplotlib")
    from moa_train.report import entropy_figure

    def run(label, choices):
        routing = {
            "routing/entropy/layer0": 0.5,
            **{f"routing/util/layer0/{c}": 1 / choices for c in range(choices)},
        }
        return {
            "label": label,
            "routing": routing,
            "rows": [{"step": s, "routing/entropy/layer0": 0.5 + s / 100} for s in (5, 10)],
        }

    ax = entropy_figure([run("model=moas_dynamic", 3), run("model=moa", 4)]).axes[0]
    maxima = {
        line.get_label(): set(line.get_ydata())
        for line in ax.get_lines()
        if line.get_label().startswith("ln ")
    }
    assert maxima == {"ln 3": {math.log(3)}, "ln 4": {math.log(4)}}


def test_report_without_runs_is_an_error(tmp_path):
    from moa_train.report import main

    with pytest.raises(SystemExit, match="no run folder"):
        main([str(tmp_path)])


def test_runs_come_in_job_order(tmp_path):
    from moa_train.report import find_runs

    for job in (10, 2, 1):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "summary.json").write_text("{}")
    assert [p.name for p in find_runs([tmp_path])] == ["1", "2", "10"]
