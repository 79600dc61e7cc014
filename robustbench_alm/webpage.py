"""The static leaderboard web page: ``robustbench-alm leaderboard --html OUT``.

    OUT/index.html                                  one sortable, filterable table per board
    OUT/entries/<dataset>/<threat model>/<id>.html  numbers, plots and provenance of one entry
    OUT/entries/<dataset>/<threat model>/<id>.json  the entry as stored (and its .parquet)
    OUT/plots/                                      every plot, PNG and SVG
    OUT/leaderboard.csv, OUT/leaderboard.md         the same table as data and as Markdown
    OUT/static/                                     the page's CSS and JavaScript

Rendered from the Jinja2 templates in ``robustbench_alm/templates`` with autoescaping on, from the
same frame as the Markdown and CSV (:func:`robustbench_alm.leaderboard.frame_from_entries`).
Needs no server: every link is relative, so the folder opens from ``file://`` or any static
host. Leaderboard-and-compare layer: no torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from robustbench_alm import __version__
from robustbench_alm.entry import entry_source, iter_entries
from robustbench_alm.leaderboard import (COLUMNS, NUMERIC, display_value, frame_from_entries,
                                         is_missing, render_markdown, write_csv)
from robustbench_alm.per_example import examples_path, find_examples
from robustbench_alm.plots import LeaderboardPlots, write_leaderboard_plots

__all__ = ["build_site"]

logger = logging.getLogger(__name__)

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_STATIC = ("site.css", "site.js")
_MARGIN_TITLES = {"all_layer": "All-layer margin", "input_space": "Input-space distance"}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.globals["pct"] = lambda v: "-" if v is None else f"{v:.2f}%"
    return env


def _entry_href(dataset: str, threat_model: str, entry_id: str) -> str:
    return f"entries/{dataset}/{threat_model}/{entry_id}.html"


def _sort_value(column: str, row: pd.Series) -> Any:
    """What a cell sorts by: numbers as numbers (eps by its value), text as shown; None if empty."""
    value = row["eps"] if column == "eps_text" else row[column]
    if is_missing(value) or value == "":
        return None
    return float(value) if column in NUMERIC or column == "eps_text" else str(value)


def _board_rows(group: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for rank, (_, row) in enumerate(group.iterrows(), start=1):
        cells = [{"key": c, "text": display_value(c, row[c]), "value": _sort_value(c, row),
                  "numeric": c in NUMERIC} for c in COLUMNS]
        rows.append({"rank": rank, "cells": cells, "source": row["source"],
                     "entry_id": row["entry_id"],
                     "flags": [f for f in str(row["flags"] or "").split(", ") if f],
                     "href": _entry_href(row["dataset"], row["threat_model"], row["entry_id"])})
    return rows


def _relative(stem: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(stem, page_dir)).as_posix()


def _boards(frame: pd.DataFrame, plots: LeaderboardPlots, out: Path) -> list[dict[str, Any]]:
    captions = {"clean_vs_robust": "Clean against robust accuracy",
                "robustness": "Robust accuracy against eps (upper bound from minimal "
                              "distances; dots: the suite's measured points)"}
    boards = []
    for (dataset, tm), group in frame.groupby(["dataset", "threat_model"], sort=True):
        made = plots.boards.get((dataset, tm), {})
        boards.append({
            "dataset": dataset, "threat_model": tm, "anchor": f"{dataset}-{tm}",
            "rows": _board_rows(group),
            "plots": [{"stem": _relative(stem, out), "caption": captions[kind]}
                      for kind, stem in made.items()],
        })
    return boards


def _columns() -> list[dict[str, Any]]:
    return [{"key": c, "title": title, "numeric": c in NUMERIC or c == "eps_text"}
            for c, title in COLUMNS.items()]


def _margin_tables(entry: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    margins = [(k, v) for k, v in (entry.get("margins") or {}).items() if v]
    keys = ["method", "n", "mean", "median", "min", "max", "n_zero", "n_not_found"]
    quantiles = sorted({q for _, stats in margins for q in stats.get("quantiles", {})})

    def show(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    tables = []
    for key, stats in margins:
        values = {k: show(stats.get(k)) for k in keys}
        values.update({q: show(stats.get("quantiles", {}).get(q)) for q in quantiles})
        tables.append({"title": _MARGIN_TITLES.get(key, key), "cells": values})
    return tables, keys + quantiles


def _provenance(entry: dict[str, Any]) -> list[tuple[str, str]]:
    if entry_source(entry) == "reported":
        reported = entry["reported"]
        return [("source", "reported, not re-evaluated here"), ("origin", reported["origin"]),
                ("record", reported["file"])]
    suite, examples = entry["suite"], entry["examples"]
    training = entry.get("training") or {}
    versions = ", ".join(f"{k} {v}" for k, v in entry["versions"].items())
    return [
        ("source", "evaluated here"),
        ("suite", f"{suite['name']}: {', '.join(suite['attacks'])}"),
        ("suite sha256", suite["sha256"]),
        ("seed", str(entry["seed"])),
        ("examples", f"{entry['n_examples']} of the {examples['split']} split "
                     f"({examples['selection']})"),
        ("example indices sha256", examples["indices_sha256"]),
        ("training method", training.get("method", "unknown")),
        ("weights sha256", entry["weights_sha256"] or "-"),
        ("versions", versions),
        ("date", entry["date"]),
        ("evaluation seconds", str(entry.get("seconds", "-"))),
    ]


def _unreliable_text(entry: dict[str, Any]) -> str:
    flag = (entry.get("reported") or {}).get("unreliable")
    return "unknown" if flag is None else ("yes" if flag else "no")


def _entry_page(env, entry: dict[str, Any], entry_file: Path, plots: LeaderboardPlots,
                out: Path, common: dict[str, Any]) -> Path:
    key = (entry["dataset"], entry["threat_model"], entry["entry_id"])
    page = out / _entry_href(*key)
    page.parent.mkdir(parents=True, exist_ok=True)
    captions = {"robustness": "Robust accuracy against eps (the dot: the suite's point)",
                "margins": "Margins of the clean-correct examples"}
    entry_plots = [{"stem": _relative(stem, page.parent), "caption": captions[kind]}
                   for kind, stem in plots.entries.get(key, {}).items()]

    # The stored entry and its per-example results go beside the page, so it is self-contained.
    (page.parent / f"{entry['entry_id']}.json").write_text(
        json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    examples_file = None
    if find_examples(entry_file, entry) is not None:
        source = examples_path(entry_file)
        shutil.copyfile(source, page.parent / source.name)
        examples_file = source.name

    margins, margin_keys = _margin_tables(entry)
    training = (entry.get("training") or {}).get("hyperparameters") or {}
    html = env.get_template("entry.html.j2").render(
        **common, prefix="../../../", entry=entry, source=entry_source(entry),
        stages=entry.get("attacks") or [], unreliable=_unreliable_text(entry),
        anchor=f"{key[0]}-{key[1]}", margins=margins, margin_keys=margin_keys,
        plots=entry_plots, provenance=_provenance(entry),
        training_params=sorted((k, json.dumps(v)) for k, v in training.items()),
        examples_file=examples_file)
    page.write_text(html, encoding="utf-8")
    return page


def build_site(root: str | Path, out: str | Path, *, plots: bool = True) -> Path:
    """Write the web page for the leaderboard folder ``root`` into ``out``; return index.html.

    Args:
        root: the leaderboard folder (``leaderboards``), entries filed as
            ``<dataset>/<threat model>/<id>.json`` with optional per-example results beside them.
        out: the folder to write; created if needed. Files of earlier runs are overwritten, not
            removed.
        plots: draw the plots (the slow part); without them the pages show no figures.
    """
    root, out = Path(root), Path(out)
    found = iter_entries(root)
    frame = frame_from_entries([entry for _, entry in found])
    out.mkdir(parents=True, exist_ok=True)
    drawn = write_leaderboard_plots(root, out / "plots") if plots else LeaderboardPlots()

    env = _environment()
    common = {"version": __version__,
              "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for entry_file, entry in found:
        _entry_page(env, entry, entry_file, drawn, out, common)
    index = out / "index.html"
    index.write_text(env.get_template("index.html.j2").render(
        **common, prefix="", boards=_boards(frame, drawn, out), columns=_columns()),
        encoding="utf-8")

    (out / "static").mkdir(exist_ok=True)
    for name in _STATIC:
        shutil.copyfile(_TEMPLATES / "static" / name, out / "static" / name)
    write_csv(frame, out / "leaderboard.csv")
    (out / "leaderboard.md").write_text(render_markdown(frame), encoding="utf-8")
    logger.info("wrote the leaderboard page for %d entries to %s", len(found), out)
    return index
