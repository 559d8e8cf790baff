"""inspection/report.py and `pipeline.py report`: report.md and its PNGs from a run trained on the
synthetic cache (2 epochs, 2 seeds, batch 12), label-blind embeddings, skipped plots said so."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.axes
import numpy as np
import pytest
import torch

import heads
from inspection import report
from train import run_folder, runs
from train.config import TrainConfig

from conftest import quiet_console

PNGS = ("losses.png", "distances.png", "tsne.png", "confusion.png")


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(synth_cache, out, seeds=(1, 2), **head):
    cfg = TrainConfig(dataset=synth_cache.dataset, cache_dir=synth_cache.cache_dir,
                      text_encoder=synth_cache.text_encoder, image_encoder=synth_cache.image_encoder,
                      head="spp_scl", head_config=heads.build_config("spp_scl", head) if head else None,
                      epochs=2, seeds=seeds, batch_size=12, eval_orders=2, out=out)
    return runs.train(cfg, quiet_console())


@pytest.fixture(scope="module")
def synth_run(synth_cache, tmp_path_factory):
    return _train(synth_cache, tmp_path_factory.mktemp("runs") / "synth")


def test_report_of_a_views_run(views_run):
    """Regression: `report` of a --text-views run (TypeError before)."""
    md = report.write_report(views_run)
    assert md.is_file() and (views_run / "confusion.png").is_file()


def test_report_writes_markdown_and_pngs(synth_run):
    md = report.write_report(synth_run)
    text = md.read_text()
    for png in PNGS:
        assert (synth_run / png).stat().st_size > 1000, png
        assert f"({png})" in text
    for term in ("ce", "cli", "clt", "step_two_rate", "IID", "TTD", "ITD", "seed 1", "positive"):
        assert term in text
    assert "skipped" not in text


def test_text_only_head_skips_image_plots_and_says_so(synth_cache, tmp_path):
    run = _train(synth_cache, tmp_path / "text", seeds=(1,), modalities="text")
    text = report.write_report(run).read_text()
    assert "intra-image (IID): skipped" in text and "image-text (ITD): skipped" in text
    assert "TTD" in text and (run / "tsne.png").is_file()


def test_embeddings_are_in_index_order_whatever_the_feed_order(synth_run):
    """Embeddings fed in a random order come back in the split's order (sample-scope parts agree)."""
    _, cfg, data = run_folder.RunFolder(synth_run).open()
    test = data.splits["test"]
    head = run_folder.RunFolder(synth_run).load_head(cfg, data.dims, 1)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))
    a = report.embeddings(head, test, len(test), torch.arange(len(test)))
    b = report.embeddings(head, test, len(test), perm)
    # I_a and T_a are per item (CMF mixes only the fused vector across the batch)
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
    np.testing.assert_allclose(a["text"], b["text"], atol=1e-5)


def test_distance_groups_pairs():
    x = np.array([[1.0, 0], [1, 0], [0, 1]])
    y = np.array([0, 0, 1])
    same, diff = report.distance_groups(x, x, y, cross=False)
    assert same.tolist() == [0.0] and np.allclose(diff, [1, 1])
    same, diff = report.distance_groups(x, x, y, cross=True)
    assert len(same) == 5 and len(diff) == 4


def test_cli_report_not_a_run_is_one_line(cli, tmp_path):
    r = cli.run("report", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not a run folder" in r.stderr


def test_seeds_without_weights_are_left_out_and_named(synth_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(synth_run, copy)
    (copy / "seed-2.pt").unlink()
    text = report.write_report(copy).read_text()
    assert "left out below: 2." in text and "| 1 |" in text and "| 2 |" not in text.split("per-class F1")[1]


def test_confusion_counts_are_white_on_dark_cells(tmp_path, monkeypatch):
    shown = []
    real = report.ConfusionMatrixDisplay.plot
    monkeypatch.setattr(report.ConfusionMatrixDisplay, "plot", lambda self, **kw: shown.append(real(self, **kw)) or shown[-1])
    cm = np.array([[40, 3, 1], [5, 22, 9], [0, 12, 30]])
    report.plot_confusions({1: cm}, ["positive", "neutral", "negative"], tmp_path / "c.png")
    d = shown[0]
    for (i, j), text in np.ndenumerate(d.text_):
        cell = d.im_.cmap(d.im_.norm(cm[i, j]))
        colour = matplotlib.colors.to_rgba(text.get_color())
        if report._luminance(cell) < 0.5:
            assert min(colour[:3]) > 0.9, (cm[i, j], colour)  # white on dark
        else:
            assert max(colour[:3]) < 0.1, (cm[i, j], colour)  # black on light
    assert any(report._luminance(d.im_.cmap(d.im_.norm(v))) < 0.5 for v in cm.ravel())  # both kinds were seen


def test_distances_use_the_range_of_the_data(tmp_path, monkeypatch):
    edges = []
    real = matplotlib.axes.Axes.hist
    monkeypatch.setattr(matplotlib.axes.Axes, "hist", lambda self, x, bins=None, **kw: edges.append(bins) or real(self, x, bins=bins, **kw))
    report.plot_distances({"ITD": (np.array([0.30, 0.32]), np.array([0.35, 0.41]))}, tmp_path / "d.png")
    assert edges[0][0] == pytest.approx(0.30) and edges[0][-1] == pytest.approx(0.41)


def test_report_on_a_run_without_weights_is_one_error_and_no_warning(synth_run, tmp_path):
    """An unfinished run (config.json and a header-only log.csv, no seed weights): the error, no plot first."""
    import shutil
    import warnings

    from core.errors import UserError

    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(synth_run / "config.json", copy)
    (copy / "log.csv").write_text((synth_run / "log.csv").read_text().splitlines()[0] + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning would fail here
        with pytest.raises(UserError, match="no seed-<s>.pt yet"):
            report.write_report(copy)
    assert not (copy / "losses.png").exists()


def test_figures_name_their_run_and_seed_and_label_every_axis(synth_run, monkeypatch):
    """Every figure is titled with the run (and seed where one seed's embeddings are shown), every
    axis of a plot labelled, and report.md explains each loss term and distance it names."""
    saved = []
    real = report.write_png
    monkeypatch.setattr(report, "write_png", lambda path, fig, **kw: saved.append((fig, Path(path)))
                        or real(path, fig, **kw))
    text = report.write_report(synth_run).read_text()
    for fig, path in saved:
        title = fig._suptitle.get_text() if fig._suptitle else ""
        assert synth_run.name in title, (path, title)
        if path.name in ("distances.png", "tsne.png"):
            assert "seed 1" in title
        for ax in fig.axes:
            if path.name != "confusion.png" and ax.has_data():
                assert ax.get_xlabel() and ax.get_ylabel(), (path, ax.get_title())
    for term in ("`cli`:", "`clt`:", "`step2_clm`:", "IID: intra-image", "TTD: intra-text", "ITD: image-text"):
        assert term in text, term
