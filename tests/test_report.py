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
    # grouped, the differing keys (the model, then moa's own keys, folded), runs, routing; no
    # Markdown in <pre>
    assert page.count("table") == 5 and page.count("details") == 1 and "pre" not in page.text
    assert "|---" not in (out / "report.html").read_text()
    assert {"group", "runs", "val/loss", "entropy (nats)", "max ln C"} <= set(page.text["th"])
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
    from moa_train.report import (
        common_overrides,
        entropy_figure,
        group_runs,
        routed_groups,
        val_loss_figure,
    )

    records = records_of(runs[0])
    assert [r["label"] for r in records] == LABELS
    assert common_overrides(records) == ["debug=tiny"]
    groups = group_runs(records)
    # in the legends, a group's runs by what tells them apart inside it
    legend = val_loss_figure(groups).axes[0].get_legend()
    texts = ["mha (2 runs)", "   trainer.seed=0", "   trainer.seed=1", "moa"]
    assert [t.get_text() for t in legend.get_texts()] == texts
    legend = entropy_figure(routed_groups(groups)).legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["moa"]


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

    groups = [{"label": g, "records": [run(g, c)]} for g, c in (("moas_dynamic", 3), ("moa", 4))]
    ax = entropy_figure(groups).axes[0]
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


# --- grouping by recipe (issue 29) ----------------------------------------------------------------


def fake_run(folder, *overrides: str, val_loss: float, steps=(10, 20)) -> None:
    """A run folder as a run leaves it (the config Hydra saves, its overrides, summary.json,
    metrics.jsonl), without training."""
    import json

    from omegaconf import OmegaConf

    from conftest import compose_train

    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_train(*overrides), folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), folder / ".hydra" / "overrides.yaml")
    (folder / "summary.json").write_text(json.dumps({"val/loss": val_loss, "steps": steps[-1]}))
    rows = [{"step": s, "val/loss": val_loss + 1 / s} for s in steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory):
    """Two seeds of one recipe (run on different devices, data folders and loggers), the same model
    at another width, a translation run of the same model, and another model."""
    root = tmp_path_factory.mktemp("mixed")
    fake_run(root / "0", "model=mha", "trainer.seed=0", val_loss=2.0)
    fake_run(
        root / "1",
        "model=mha",
        "trainer.seed=1",
        "trainer.device=cpu",
        "data.root=/elsewhere",
        "logger=tensorboard",
        "trainer.resume=false",
        val_loss=2.2,
    )
    fake_run(root / "2", "model=mha", "model.d_model=64", val_loss=1.5)
    fake_run(root / "3", "experiment=multi30k/mha", val_loss=4.0)
    fake_run(root / "4", "model=moa", val_loss=2.1)
    return root


def test_recipe_leaves_out_seed_paths_loggers_device_and_resume(compose_cfg):
    from moa_train.report import recipe

    base = recipe(compose_cfg("model=mha"))
    same = recipe(
        compose_cfg(
            "model=mha",
            "trainer.seed=3",
            "trainer.device=cpu",
            "trainer.resume=false",
            "data.root=/elsewhere",
            "logger=tensorboard",
            "experiment_name=other",
        )
    )
    assert same == base
    assert base["trainer.max_steps"] == "600" and base["trainer.precision"] == "fp32"
    assert base["task.name"] == "lm"  # the data's default task
    for override in (
        "trainer.max_steps=7",
        "trainer.batch_size=4",
        "trainer.block_size=64",
        "trainer.precision=bf16",
        "optim.lr=0.01",
        "schedule=constant",
        "task.average_last=2",
    ):
        assert recipe(compose_cfg("model=mha", override)) != base, override


def test_runs_are_grouped_by_recipe_not_by_model_name(mixed_runs, tmp_path):
    from moa_train.report import main

    out = tmp_path / "report"
    main([str(mixed_runs), "--out", str(out)])
    with open(out / "report.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    # the model alone where it tells a group apart; the choice (data=) for the translation run, not
    # every key its data changes
    assert list(rows) == [
        "mha data=wikitext2_char model.d_model=128",
        "mha data=wikitext2_char model.d_model=64",
        "mha data=multi30k_en_de",
        "moa",
    ]
    seeds = rows["mha data=wikitext2_char model.d_model=128"]
    assert seeds["runs"] == "2" and float(seeds["val/loss"]) == pytest.approx(2.1)
    assert float(seeds["val/loss std"]) == pytest.approx(statistics.stdev([2.0, 2.2]))
    assert [rows[g]["runs"] for g in list(rows)[1:]] == ["1", "1", "1"]
    assert rows["mha data=multi30k_en_de"]["data.name"] == "multi30k_en_de"
    md = (out / "report.md").read_text()
    differing = md.split("Recipe keys that differ between groups:")[1].split("\n\n")[1]
    keys = [line.split(" | ")[0].strip("| ") for line in differing.splitlines()[2:]]
    assert keys[:3] == ["model.name", "data.name", "model.d_model"]
    assert "task.name" in keys and "model.n_experts" in keys  # the keys that go with a choice too
    assert not {"trainer.seed", "trainer.device", "data.root", "trainer.resume"} & set(keys)
    page = Page((out / "report.html").read_text())
    assert "mha data=wikitext2_char model.d_model=64" in page.text["td"]


def test_group_by_pools_as_asked_and_says_what_it_mixed(mixed_runs, tmp_path, capsys):
    from moa_train.report import main

    out = tmp_path / "report"
    main([str(mixed_runs), "--out", str(out), "--group-by", "model.name"])
    with open(out / "report.csv") as f:
        rows = {r["model.name"]: r for r in csv.DictReader(f)}
    assert rows["mha"]["runs"] == "4" and rows["moa"]["runs"] == "1"
    md = (out / "report.md").read_text()
    assert "Pooled by --group-by although their recipes differ" in md
    assert "| mha | model.d_model | 128 / 64 / 256 |" in md
    assert "| mha | data.name | wikitext2_char / multi30k_en_de |" in md
    err = capsys.readouterr().err
    assert "warning: group mha pools runs whose recipes differ in" in err and "data.name" in err


def test_group_by_a_key_no_run_has_is_refused(mixed_runs, capsys, tmp_path):
    from moa_train.report import main

    main([str(mixed_runs), "--group-by", "model.vocab_size", "--out", str(tmp_path)])  # null: there
    with open(tmp_path / "report.csv") as f:
        assert [r["model.vocab_size"] for r in csv.DictReader(f)] == ["null"]
    capsys.readouterr()

    with pytest.raises(SystemExit) as stop:
        main([str(mixed_runs), "--group-by", "model.nmae"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        (
            "error: --group-by: no run's config has the key 'model.nmae' (a dotted key, e.g. "
            "model.name, data.name, trainer.max_steps)"
        )
    ]


def test_plots_give_each_group_one_hue_and_its_runs_shades_of_it(mixed_runs, tmp_path):
    pytest.importorskip("matplotlib")
    import colorsys
    import shutil

    from matplotlib.colors import to_rgb

    from moa_train.report import group_runs, val_loss_figure

    for job in ("0", "1", "4"):  # two seeds of mha, one moa
        shutil.copytree(mixed_runs / job, tmp_path / job)
    groups = group_runs(records_of(tmp_path))
    ax = val_loss_figure(groups).axes[0]
    hls = [colorsys.rgb_to_hls(*to_rgb(line.get_color())) for line in ax.get_lines()]
    (seed0, seed1, moa) = hls
    assert seed0[0] == pytest.approx(seed1[0], abs=0.02)  # one hue...
    assert abs(seed0[1] - seed1[1]) > 0.1  # ...in two shades
    assert abs(seed0[0] - moa[0]) > 0.05  # another group, another hue
    assert ax.get_lines()[0].get_linestyle() != ax.get_lines()[1].get_linestyle()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "mha (2 runs)",
        "   trainer.seed=0",
        (
            "   trainer.seed=1 trainer.device=cpu data.root=/elsewhere logger=tensorboard "
            "trainer.resume=false"
        ),
        "moa",
    ]


def test_heatmap_scale_is_white_at_an_even_share_and_its_text_reads():
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgb

    from moa_train.report import utilisation_figure

    routing = {"routing/util/layer0/mha": 1 / 3, "routing/util/layer0/gqa": 0.07}
    routing["routing/util/layer0/mqa"] = 1 - sum(routing.values())
    ax = utilisation_figure(routing, "t").axes[0]
    image = ax.images[0]
    assert image.get_clim() == (0.0, 1.0)  # one scale for every run
    even = image.cmap(image.norm(1 / 3))
    assert image.norm(1 / 3) == pytest.approx(0.5) and min(even[:3]) > 0.9  # near white
    text = {t.get_text(): to_rgb(t.get_color()) for t in ax.texts}
    assert text == {"0.33": (0, 0, 0), "0.07": (1, 1, 1), "0.60": (0, 0, 0)}


def test_html_cells_do_not_wrap_and_wide_tables_scroll_in_a_box(mixed_runs, tmp_path):
    from moa_train.report import main

    out = tmp_path / "report"
    main([str(mixed_runs), "--out", str(out)])
    text = (out / "report.html").read_text()
    page = Page(text)
    tags = page.tags
    tables = [i for i, (tag, _) in enumerate(tags) if tag == "table"]
    assert tables and all(tags[i - 1] == ("div", {"class": "table"}) for i in tables)
    assert "white-space:nowrap" in text.split("th,td{")[1].split("}")[0]
    assert ".table{overflow-x:auto" in text


def test_the_report_folder_is_ignored_by_git():
    import shutil
    import subprocess

    from conftest import REPO

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "report/report.html"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0
