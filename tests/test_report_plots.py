"""The report's paper figures (issue 29, regbench.report_figures): small multiples with a t-interval band over
seeds, forest plots of Δ with its CI, each as PNG + PDF + SVG, byte-identical for the same input."""

import math
import re
import xml.etree.ElementTree as ET

import pytest
from scipy import stats

from regbench.errors import RegbenchError
from regbench.report_figures import (
    _mean_curve,
    mean_band,
    plot_forest,
    plot_small_multiples,
)
from regbench.report_plots import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves():
    """A baseline (3 seeds), a config whose seeds stopped early at different epochs, with a not-evaluated epoch
    and a NaN, and a config with a long name."""
    base = [[1.0 / (e + 1) + 0.30 + 0.01 * s for e in range(8)] for s in range(3)]
    drop = [[1.0 / (e + 1) + 0.20 - 0.01 * s for e in range(n)] for s, n in enumerate((8, 6, 5))]
    drop[0][2] = drop[1][2] = drop[2][2] = None  # not evaluated (trainer.eval_every)
    drop[1][3] = math.nan
    long_name = "regularizer=[l2,dropout],optimizer=sgd," + ",".join(f"key{i}.value={i}" for i in range(12))
    return {"baseline": base, "regularizer=[dropout]": drop, long_name: [list(s) for s in base]}


def _svg_axes(path) -> int:
    root = ET.parse(path).getroot()  # parses as XML
    return sum(1 for g in root.iter("{http://www.w3.org/2000/svg}g") if re.fullmatch(r"axes_\d+", g.get("id", "")))


def test_mean_band_is_scipy_t_interval_of_the_mean():
    values = [1.0, 2.0, 4.0]
    mean, lo, hi = mean_band(values)
    ref_lo, ref_hi = stats.t.interval(0.95, df=2, loc=7 / 3, scale=stats.sem(values))
    assert mean == pytest.approx(7 / 3) and lo == pytest.approx(ref_lo) and hi == pytest.approx(ref_hi)
    # by hand: s = sqrt(7/3), t(0.975, 2) = 4.302653, half-width = t * s / sqrt(3)
    assert hi - mean == pytest.approx(4.302653 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-5)
    assert mean_band([0.5]) == (0.5, None, None)  # one seed: no interval, not one of width 0
    assert mean_band([2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = mean_band([1.0, math.nan, 2.0])
    assert math.isnan(m) and math.isnan(lo) and math.isnan(hi)


def test_the_mean_curve_uses_the_epochs_every_seed_reached():
    c = _mean_curve(_curves()["regularizer=[dropout]"])
    # epochs 1, 2, 4, 5 (3 was not evaluated; 6-8 only some seeds reached: no mean over the survivors)
    assert c["epochs"] == [1, 2, 4, 5] and c["common"] == 5 and c["longest"] == 8 and c["nonfinite"] == 1
    assert math.isnan(c["mean"][2]) and math.isnan(c["lo"][2])  # the NaN at epoch 4: a gap, not a number
    assert c["mean"][0] == pytest.approx(1.0 + 0.20 - 0.01)  # mean of 1.2, 1.19, 1.18


def test_small_multiples_in_three_formats_one_panel_per_configuration(tmp_path):
    curves = _curves()
    paths = plot_small_multiples(curves, "baseline", tmp_path)
    assert [p.name for p in paths] == [f"small_multiples_val_loss.{x}" for x in ("png", "pdf", "svg")]
    png, pdf, svg = paths
    assert png.read_bytes().startswith(PNG_MAGIC) and pdf.read_bytes().startswith(b"%PDF")
    assert _svg_axes(svg) == len(curves)
    text = svg.read_text()
    assert text.count("PolyCollection") == 3  # a CI band in every panel (all have ≥ 2 seeds)
    assert "mean: epochs 1–5 (all seeds)" in text and "1 NaN/inf value(s): gaps" in text
    assert "(baseline)" in text and "95% CI of the mean (t)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp file left


def test_figures_are_byte_identical_for_the_same_input(tmp_path):
    rows = [{"config": "a", "metric": "best_val_loss", "delta": -0.1, "lo": -0.2, "hi": -0.05, "verdict": "lower"}]
    for run in ("1", "2"):
        (tmp_path / run).mkdir()
        plot_small_multiples(_curves(), "baseline", tmp_path / run)
        plot_forest(rows, tmp_path / run)
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert len(names) == 6 and any(n.endswith(".svg") for n in names) and any(n.endswith(".pdf") for n in names)
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_one_seed_one_configuration_gives_no_band(tmp_path):
    label = r"lr=$\undefined{x}$," + "x" * 300  # a long name, with a dollar pair that is text, not mathtext
    paths = plot_small_multiples({label: [[0.9, None, 0.7, 0.6]]}, None, tmp_path, metric="clean_gap_loss")
    svg = paths[2]
    assert svg.name == "small_multiples_clean_gap_loss.svg" and _svg_axes(svg) == 1
    text = svg.read_text()
    assert "PolyCollection" not in text and "1 seed: no CI band" in text and "baseline (mean)" not in text
    assert r"lr=$\undefined{x}$" in text


def test_overfitting_view_draws_train_dashed_next_to_val(tmp_path):
    curves = _curves()
    train = {k: [[None if v is None else v - 0.1 for v in s] for s in seeds] for k, seeds in curves.items()}
    paths = plot_small_multiples(curves, "baseline", tmp_path, train=train, train_metric="clean_train_loss")
    assert paths[2].name == "overfitting_val_loss.svg" and _svg_axes(paths[2]) == 3
    text = paths[2].read_text()
    assert "training (mean)" in text and "clean_train_loss (dashed) and val_loss (solid)" in text


def test_a_baseline_that_is_no_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="baseline 'nope'"):
        plot_small_multiples(_curves(), "nope", tmp_path)
    assert not list(tmp_path.iterdir())


def _hollow_points(svg) -> int:
    return svg.read_text().count('style="fill: #ffffff; stroke: #0072b2"')


def test_forest_plot_per_metric_filled_where_the_ci_excludes_zero(tmp_path):
    rows = [
        {"config": "crosses", "metric": "best_val_loss", "delta": 0.01, "lo": -0.02, "hi": 0.04,
         "verdict": "within noise (95 % CI of Δ: −0.020 … +0.040)"},
        {"config": "below", "metric": "best_val_loss", "delta": -0.1, "lo": -0.15, "hi": -0.05,
         "verdict": "lower than the baseline (p_holm = 0.004)"},
        {"config": "one seed", "metric": "best_val_loss", "delta": 0.2, "lo": None, "hi": math.nan,
         "verdict": "one seed: no interval"},
        {"config": "no value", "metric": "best_val_loss", "delta": math.nan, "lo": None, "hi": None, "verdict": ""},
        {"config": "above", "metric": "test ece", "delta": 0.03, "lo": 0.01, "hi": 0.05, "verdict": "higher"},
    ]
    paths = plot_forest(rows, tmp_path)
    assert [p.name for p in paths] == [f"forest_{m}.{x}" for m in ("best_val_loss", "test_ece")
                                       for x in ("png", "pdf", "svg")]
    assert paths[1].read_bytes().startswith(b"%PDF") and paths[0].read_bytes().startswith(PNG_MAGIC)
    loss, ece = paths[2].read_text(), paths[5].read_text()
    ET.fromstring(loss)
    # hollow: "crosses" and "one seed" (+ the legend's hollow marker); "below" is filled; "no value" has no point
    assert _hollow_points(paths[2]) == 3 and _hollow_points(paths[5]) == 1
    assert "Δ vs baseline (95% CI)" in loss and "lower than the baseline (p_holm = 0.004)" in loss
    assert "(no Δ)" in loss and "higher" in ece


def test_forest_metrics_that_share_a_file_name_are_refused(tmp_path):
    rows = [{"config": "a", "metric": m, "delta": 0.0, "lo": -1.0, "hi": 1.0, "verdict": ""} for m in ("a b", "a/b")]
    with pytest.raises(ValueError, match="same file name"):
        plot_forest(rows, tmp_path)


def test_an_unwritable_folder_is_one_regbench_error(tmp_path):
    rows = [{"config": "a", "metric": "m", "delta": 0.0, "lo": -1.0, "hi": 1.0, "verdict": ""}]
    with pytest.raises(RegbenchError, match="--out"):
        plot_forest(rows, tmp_path / "missing")


def test_the_overlaid_plots_take_a_folder_name_with_dollars_as_text(tmp_path):
    label = r"lr=$\undefined{x}$"
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "clean_train_loss": None, "gap_loss": 0.2 / e,
             "clean_gap_loss": None} for e in (1, 2, 3)]
    runs = [{"config": label, "rows": rows}, {"config": label, "rows": rows}]
    table = [{"config": label, "label": label, "final_gap": 0.07, "final_gap_std": 0.0}]
    paths = plot(runs, table, tmp_path)  # mathtext would raise ValueError on \undefined
    assert [p.name for p in paths] == ["curves.png", "gap.png", "final_gap.png"]
