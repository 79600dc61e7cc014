"""Plots: the eps curve by hand, files in both formats, reproducible SVGs."""

import numpy as np
import pandas as pd
import pytest

from robustbench_alm.entry import write_entry
from robustbench_alm.leaderboard import entries_frame
from robustbench_alm.plots import (CurveItem, plot_clean_vs_robust, plot_margin_histograms,
                                   plot_robustness_curves, robust_accuracy_at,
                                   write_leaderboard_plots)
from tests.test_entry import make_entry
from tests.test_per_example import make_arrays, write_evaluated

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _frame(clean, distance):
    return pd.DataFrame({"clean_correct": np.array(clean, bool),
                         "input_space_distance": np.array(distance, float),
                         "all_layer_margin": np.array(distance, float)})


def test_robust_accuracy_from_distances_by_hand():
    # Four points: correct at distance 0.05, correct at 0.2, correct and never broken, wrong.
    frame = _frame([True, True, True, False], [0.05, 0.2, np.inf, 0.0])
    eps = np.array([0.0, 0.05, 0.1, 0.2, 0.3])
    # Robust at eps iff correct and distance > eps (strictly: at 0.05 the first point is broken).
    np.testing.assert_allclose(robust_accuracy_at(frame, eps), [75.0, 50.0, 50.0, 25.0, 25.0])


def test_missing_distances_refused_and_left_out(tmp_path):
    frame = _frame([True, False], [np.nan, np.nan])
    with pytest.raises(ValueError, match="missing"):
        robust_accuracy_at(frame, np.array([0.1]))
    assert plot_robustness_curves([CurveItem("m", frame, 0.1, 0.0)], tmp_path / "c",
                                  threat_model="Linf") == []


def test_plots_written_as_png_and_svg(tmp_path):
    a = pd.DataFrame(make_arrays(n=120, seed=0))
    b = pd.DataFrame(make_arrays(n=120, seed=1, scale=0.2))
    items = [CurveItem("a", a, 0.1, 100 * a["robust"].mean()),
             CurveItem("b", b, 0.1, 100 * b["robust"].mean())]
    written = plot_robustness_curves(items, tmp_path / "curve", threat_model="Linf")
    written += plot_margin_histograms([("a", a), ("b", b)], tmp_path / "hist",
                                      threat_model="Linf", eps=0.1)
    assert [p.name for p in written] == ["curve.png", "curve.svg", "hist.png", "hist.svg"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) if path.suffix == ".png" else b"<svg" in data[:500]

    # The same data give byte-identical SVGs (no date, fixed hash salt).
    first = (tmp_path / "curve.svg").read_bytes()
    plot_robustness_curves(items, tmp_path / "curve", threat_model="Linf")
    assert (tmp_path / "curve.svg").read_bytes() == first


def test_leaderboard_plots(tmp_path):
    root = tmp_path / "lb"
    write_evaluated(root, "amo", make_arrays(n=80, seed=0))
    write_evaluated(root, "pgd", make_arrays(n=80, seed=1))
    write_entry(root, make_entry(entry_id="no-rows"))  # evaluated, but no per-example file
    drawn = write_leaderboard_plots(root, tmp_path / "plots")
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(p.name for p in drawn.files())
    assert "fashion-mnist-Linf-clean-vs-robust.svg" in names
    assert "fashion-mnist-Linf-robustness-vs-eps.png" in names
    assert "fashion-mnist-Linf-amo-margins.png" in names
    assert not any("no-rows" in name for name in names)
    assert plot_clean_vs_robust(entries_frame(root).iloc[0:0], tmp_path / "none") == []
