"""Leaderboard tables: sorted by robust accuracy, and no torch needed to build them (nor the
web page, the plots, the comparison or the RobustBench import and export)."""

import subprocess
import sys

import pytest

from robustbench_alm.entry import write_entry
from robustbench_alm.leaderboard import entries_frame, write_readme
from tests.test_entry import make_entry
from tests.test_per_example import make_arrays, write_evaluated


def test_sorted_by_robust_accuracy(tmp_path):
    write_entry(tmp_path, make_entry(entry_id="weak", robust_acc=40.0, autoattack_acc=40.0))
    write_entry(tmp_path, make_entry(entry_id="strong", robust_acc=70.5, autoattack_acc=70.5))
    write_entry(tmp_path, make_entry(entry_id="other-tm", threat_model="L2", robust_acc=99.0,
                                     clean_acc=99.5, autoattack_acc=None))
    frame = entries_frame(tmp_path)
    linf = frame[frame.threat_model == "Linf"]
    assert list(linf.entry_id) == ["strong", "weak"]
    path, text = write_readme(tmp_path)
    assert path.read_text() == text
    assert text.index("## fashion-mnist, L2") < text.index("## fashion-mnist, Linf")
    assert text.index("strong") < text.index("weak")
    assert "70.50" in text and "0.0900" in text  # accuracy and median all-layer margin


def test_empty_leaderboard(tmp_path):
    _, text = write_readme(tmp_path)
    assert "No entries yet" in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_readme(tmp_path / "typo")  # a mistyped folder is an error, not a new board
    assert not (tmp_path / "typo").exists()


def test_leaderboard_never_imports_torch(tmp_path):
    write_entry(tmp_path, make_entry())
    code = ("import sys; from robustbench_alm.leaderboard import write_readme; "
            f"write_readme({str(tmp_path)!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_page_and_robustbench_never_import_torch(tmp_path):
    a = write_evaluated(tmp_path / "lb", "a", make_arrays(seed=0))
    b = write_evaluated(tmp_path / "lb", "b", make_arrays(seed=1))
    out = tmp_path / "site"
    code = f"""
import sys
from robustbench_alm.cli import main
assert main(["compare", {str(a)!r}, {str(b)!r}, "--bootstrap", "100",
             "--plots", {str(out / "cmp")!r}]) == 0
assert main(["leaderboard", "--dir", {str(tmp_path / "lb")!r}, "--html", {str(out)!r},
             "--csv", {str(out / "x.csv")!r}, "--plots", {str(out / "p")!r}]) == 0
assert main(["export-robustbench", "--dir", {str(tmp_path / "lb")!r},
             "--out", {str(out / "mi")!r}]) == 0
from robustbench_alm import robustbench_io, stats, per_example, plots, webpage, compare
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] == "torch" or m.startswith("robustbench_alm.attacks"))
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
