"""Plots of entries and their per-example results, each written as PNG and SVG.

- :func:`plot_robustness_curves`: robust accuracy against eps for each model, read off the
  input-space minimal distances (a point is robust at eps when it is clean-correct and its
  distance exceeds eps). The minimal-norm attack only finds upper bounds on the distances, so
  the curve is an upper bound too; the accuracy the suite measured at its eps is marked on it.
- :func:`plot_margin_histograms`: the distribution of all-layer margins and of input-space
  distances over the clean-correct points of each model.
- :func:`plot_clean_vs_robust`: clean against robust accuracy for a whole leaderboard.

:func:`write_leaderboard_plots` draws all of them for a leaderboard folder: per table, the
scatter and the curves of its entries; per evaluated entry, its curve and its histograms.

Uses matplotlib's object interface (``Figure`` with the Agg canvas), never ``pyplot``: no global
backend is switched and no window opens. SVGs carry no date and a fixed hash salt, so the same
data give the same file. Leaderboard-and-compare layer: no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustbench_alm.entry import iter_entries
from robustbench_alm.leaderboard import frame_from_entries
from robustbench_alm.per_example import find_examples

__all__ = ["CurveItem", "LeaderboardPlots", "robust_accuracy_at", "eps_grid",
           "plot_robustness_curves", "plot_margin_histograms", "plot_clean_vs_robust",
           "plot_method_summary", "write_leaderboard_plots", "FORMATS"]

logger = logging.getLogger(__name__)

#: Every plot is written in these formats, with these suffixes.
FORMATS = ("png", "svg")
_STYLE = {"svg.hashsalt": "robustbench-alm", "font.size": 9, "axes.grid": True,
          "grid.alpha": 0.3}


@dataclass(frozen=True)
class CurveItem:
    """One model on a robustness curve: its per-example rows and the suite's measured point."""

    label: str
    frame: pd.DataFrame
    eps: float
    robust_acc: float


def robust_accuracy_at(frame: pd.DataFrame, eps: np.ndarray) -> np.ndarray:
    """Robust accuracy in % at each eps: clean-correct and minimal distance > eps.

    A distance of +inf (no adversarial example found) counts as robust at every eps. NaN
    (distances not estimated) raises, since no curve can be read off it.
    """
    distance = frame["input_space_distance"].to_numpy(np.float64)
    if np.isnan(distance).any():
        raise ValueError(f"{int(np.isnan(distance).sum())} of {distance.size} input-space "
                         "distances are missing (NaN); evaluate with margins to get a curve")
    correct = frame["clean_correct"].to_numpy(bool)
    eps = np.asarray(eps, dtype=np.float64)
    # robust: (n_eps, n_examples) -> mean over examples
    robust = correct[None, :] & (distance[None, :] > eps[:, None])
    return 100.0 * robust.mean(axis=1)


def eps_grid(items: list[CurveItem], n_points: int = 241) -> np.ndarray:
    """From 0 to past the suite's eps and most measured distances, so every curve is seen."""
    reach = [2.0 * item.eps for item in items]
    for item in items:
        finite = item.frame["input_space_distance"].to_numpy(np.float64)
        finite = finite[np.isfinite(finite) & (finite > 0)]
        if finite.size:
            reach.append(float(np.quantile(finite, 0.95)))
    return np.linspace(0.0, max(reach + [1e-3]), n_points)


def _save(figure: Figure, out_stem: Path) -> list[Path]:
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    paths = []
    for fmt in FORMATS:
        path = out_stem.with_name(f"{out_stem.name}.{fmt}")
        metadata = {"Date": None} if fmt == "svg" else None
        figure.savefig(path, format=fmt, dpi=120, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths


def _has_distances(frame: pd.DataFrame) -> bool:
    return not frame["input_space_distance"].isna().any()


def plot_robustness_curves(items: list[CurveItem], out_stem: str | Path, *,
                           threat_model: str, title: str = "") -> list[Path]:
    """Robust accuracy against eps per model, the suite's measured points marked.

    Models whose distances were not estimated are left out (logged). Returns the files written,
    or nothing when no model has distances.
    """
    usable = [item for item in items if _has_distances(item.frame)]
    for item in items:
        if item not in usable:
            logger.info("%s has no input-space distances; left out of the eps curve", item.label)
    if not usable:
        return []
    grid = eps_grid(usable)
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(6.0, 4.0))
        ax = figure.add_subplot()
        for i, item in enumerate(usable):
            color = f"C{i % 10}"
            ax.step(grid, robust_accuracy_at(item.frame, grid), where="post", color=color,
                    label=f"{item.label} (minimal distances)")
            ax.plot([item.eps], [item.robust_acc], marker="o", markersize=7, color=color,
                    markeredgecolor="black", linestyle="none",
                    label=f"{item.label}: suite at eps {item.eps:g}")
        ax.set_xlabel(f"eps ({threat_model})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_xlim(0, grid[-1])
        ax.set_ylim(0, 100)
        ax.set_title(title or "Robust accuracy against eps (upper bound from minimal distances)")
        ax.legend(fontsize=7, loc="upper right")
        return _save(figure, Path(out_stem))


def _finite_positive(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, int]:
    """Finite values over the clean-correct points, and how many were not found (+inf)."""
    values = frame.loc[frame["clean_correct"], column].to_numpy(np.float64)
    return values[np.isfinite(values)], int(np.isposinf(values).sum())


def _histogram_panel(ax, items: list[tuple[str, pd.DataFrame]], column: str, xlabel: str,
                     eps: float | None) -> None:
    data = [(label, *_finite_positive(frame, column)) for label, frame in items
            if not frame[column].isna().all()]
    if not data:
        ax.text(0.5, 0.5, "not estimated", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return
    pooled = np.concatenate([values for _, values, _ in data])
    bins = np.histogram_bin_edges(pooled if pooled.size else [0.0, 1.0], bins=30)
    for i, (label, values, not_found) in enumerate(data):
        extra = f", {not_found} not found" if not_found else ""
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=f"C{i % 10}",
                label=f"{label} (n={values.size}{extra})")
    if eps is not None:
        ax.axvline(eps, color="black", linestyle=":", linewidth=1, label=f"eps {eps:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clean-correct examples")
    ax.legend(fontsize=7)


def plot_margin_histograms(items: list[tuple[str, pd.DataFrame]], out_stem: str | Path, *,
                           threat_model: str, eps: float | None = None,
                           title: str = "") -> list[Path]:
    """Histograms of all-layer margins (left) and input-space distances (right) per model.

    Over clean-correct points only (a mistake has margin 0); points where the search found no
    flip (+inf) are counted in the legend, not drawn.
    """
    if not items:
        return []
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(9.0, 3.6))
        left, right = figure.subplots(1, 2)
        _histogram_panel(left, items, "all_layer_margin", "all-layer margin", None)
        _histogram_panel(right, items, "input_space_distance",
                         f"input-space minimal distance ({threat_model})", eps)
        figure.suptitle(title or "Margins of the clean-correct examples")
        return _save(figure, Path(out_stem))


def plot_clean_vs_robust(board: pd.DataFrame, out_stem: str | Path, *,
                         title: str = "") -> list[Path]:
    """Clean against robust accuracy, one point per entry of a leaderboard frame.

    Entries evaluated here are filled circles labelled with their id; reported ones (imported
    from RobustBench) are grey crosses. The dashed diagonal is robust = clean.
    """
    if board.empty:
        return []
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(6.0, 4.5))
        ax = figure.add_subplot()
        reported = board[board["source"] == "reported"]
        evaluated = board[board["source"] != "reported"]
        if not reported.empty:
            ax.scatter(reported["clean_acc"], reported["robust_acc"], marker="x", color="0.5",
                       s=22, label=f"reported, not re-evaluated ({len(reported)})")
        if not evaluated.empty:
            ax.scatter(evaluated["clean_acc"], evaluated["robust_acc"], marker="o", color="C0",
                       edgecolor="black", s=36, zorder=3,
                       label=f"evaluated here ({len(evaluated)})")
            for _, row in evaluated.iterrows():
                ax.annotate(row["entry_id"], (row["clean_acc"], row["robust_acc"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.plot([0, 100], [0, 100], linestyle="--", color="0.7", linewidth=1)
        low = max(0.0, float(board["robust_acc"].min()) - 5)
        ax.set_xlim(max(0.0, float(board["clean_acc"].min()) - 5), 100)
        ax.set_ylim(low, min(100.0, float(board["robust_acc"].max()) + 5))
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(title or "Clean against robust accuracy")
        ax.legend(fontsize=7, loc="upper left")
        return _save(figure, Path(out_stem))


def plot_method_summary(records: pd.DataFrame, metrics: dict[str, str], out_stem: str | Path,
                        *, methods: list[str] | None = None, title: str = "") -> list[Path]:
    """One panel per metric: each method's mean over seeds with +-1 std, every seed a dot.

    Args:
        records: one row per trained model, with a ``method`` column and the metric columns.
        metrics: column name to axis label, in panel order; columns that are all NaN are skipped.
        methods: the order of the methods on the x axis (default: as they first appear).
    """
    metrics = {c: label for c, label in metrics.items()
               if c in records.columns and records[c].notna().any()}
    if records.empty or not metrics:
        return []
    methods = methods or list(dict.fromkeys(records["method"]))
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(3.0 * len(metrics), 3.4))
        axes = np.atleast_1d(figure.subplots(1, len(metrics)))
        for ax, (column, label) in zip(axes, metrics.items()):
            for i, method in enumerate(methods):
                values = records.loc[records["method"] == method, column].dropna()
                values = values.to_numpy(np.float64)
                if not values.size:
                    continue
                spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
                ax.errorbar([i], [values.mean()], yerr=[spread], fmt="s", color=f"C{i % 10}",
                            capsize=4, markersize=6)
                ax.scatter(np.full(values.size, i + 0.15), values, s=10, color="0.3", zorder=3)
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
            ax.set_ylabel(label)
        figure.suptitle(title or "Per method: mean and std over seeds (dots: seeds)")
        return _save(figure, Path(out_stem))


@dataclass
class LeaderboardPlots:
    """What :func:`write_leaderboard_plots` wrote, as file stems (add ``.png`` or ``.svg``).

    ``boards`` maps (dataset, threat model) to ``{"clean_vs_robust": stem, "robustness": stem}``;
    ``entries`` maps (dataset, threat model, entry id) to ``{"robustness": ..., "margins": ...}``.
    A plot that had no data to show is absent.
    """

    boards: dict[tuple[str, str], dict[str, Path]] = field(default_factory=dict)
    entries: dict[tuple[str, str, str], dict[str, Path]] = field(default_factory=dict)
    examples: dict[tuple[str, str, str], pd.DataFrame] = field(default_factory=dict)

    def files(self) -> list[Path]:
        stems = [s for d in (*self.boards.values(), *self.entries.values()) for s in d.values()]
        return [stem.with_name(f"{stem.name}.{fmt}") for stem in stems for fmt in FORMATS]


def _entry_plots(entry: dict[str, Any], frame: pd.DataFrame, stem: Path) -> dict[str, Path]:
    label, tm = entry["entry_id"], entry["threat_model"]
    done: dict[str, Path] = {}
    curve = CurveItem(label, frame, entry["eps"], entry["robust_acc"])
    if plot_robustness_curves([curve], f"{stem}-robustness", threat_model=tm,
                              title=f"{label}: robust accuracy against eps"):
        done["robustness"] = Path(f"{stem}-robustness")
    if plot_margin_histograms([(label, frame)], f"{stem}-margins", threat_model=tm,
                              eps=entry["eps"], title=f"{label}: margins"):
        done["margins"] = Path(f"{stem}-margins")
    return done


def write_leaderboard_plots(root: str | Path, out_dir: str | Path) -> LeaderboardPlots:
    """Draw every plot of the leaderboard folder ``root`` into ``out_dir``.

    Files are named ``<dataset>-<threat model>-clean-vs-robust``, ``...-robustness-vs-eps`` and,
    per evaluated entry with per-example results, ``<dataset>-<threat model>-<id>-robustness``
    and ``...-<id>-margins``, each as PNG and SVG.
    """
    out_dir = Path(out_dir)
    found = iter_entries(Path(root))
    board = frame_from_entries([entry for _, entry in found])
    result = LeaderboardPlots()
    by_key = {(e["dataset"], e["threat_model"], e["entry_id"]): e for _, e in found}
    for path, entry in found:
        frame = find_examples(path, entry)
        if frame is None:
            continue
        key = (entry["dataset"], entry["threat_model"], entry["entry_id"])
        result.examples[key] = frame
        result.entries[key] = _entry_plots(entry, frame, out_dir / "-".join(key))

    for (dataset, tm), group in board.groupby(["dataset", "threat_model"], sort=True):
        stem = out_dir / f"{dataset}-{tm}"
        done = result.boards.setdefault((dataset, tm), {})
        if plot_clean_vs_robust(group, f"{stem}-clean-vs-robust",
                                title=f"{dataset}, {tm}: clean against robust accuracy"):
            done["clean_vs_robust"] = Path(f"{stem}-clean-vs-robust")
        curves = [CurveItem(key[2], frame, by_key[key]["eps"], by_key[key]["robust_acc"])
                  for key, frame in result.examples.items() if key[:2] == (dataset, tm)]
        if plot_robustness_curves(curves, f"{stem}-robustness-vs-eps", threat_model=tm,
                                  title=f"{dataset}, {tm}: robust accuracy against eps"):
            done["robustness"] = Path(f"{stem}-robustness-vs-eps")
    logger.info("wrote %d plot files to %s", len(result.files()), out_dir)
    return result
